"""Task ``memory``: bytes a ReID training forward and its loss keep for the backward, per part of the model:
where a step's peak goes.

A training step's memory peaks near the start of its backward, when everything the forward saved for it is
still held. This runs the configured ReID model and loss forward on the CPU (bf16 autocast, as a GPU step
runs, at the configured input size) under ``torch.autograd.graph.saved_tensors_hooks`` and adds up, per
top-level part of the model and for the loss, the bytes of every distinct storage saved. It runs two small
batches (``--batches``, default K and 2K samples for ``DATALOADER.NUM_INSTANCE`` K) and splits each part
into a fixed share (weights or their copies) and a per-sample share, extrapolated to ``SOLVER.IMS_PER_BATCH``.

This is the eager step: a compiled graph saves what its partitioner chooses, usually less. A copy made once
per sample shows in both (a broadcast matmul that saved a weight once per sample was found this way).
"""

from __future__ import annotations

import argparse
import collections

import torch
from yacs.config import CfgNode as CN

from engine.config import load_config
from engine.device import build_amp_policy
from engine.reid import ReIDObjective, build_reid_model
from losses import ReIDCriterion
from tools.benchmarks.op_count import PartStack
from tools.benchmarks.train_step import is_fewshot, reid_batch, with_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--batches", type=int, nargs=2, default=None,
                        help="the two batch sizes measured (default: K and 2K, K = DATALOADER.NUM_INSTANCE)")
    parser.add_argument("--num-classes", type=int, default=171)
    parser.add_argument("--num-cameras", type=int, default=4)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


class SavedBytes:
    """Adds up, by :class:`PartStack` part, the bytes of each distinct storage that autograd saves while active
    (a storage saved twice counts once, for the part that saved it first)."""

    def __init__(self, parts: PartStack) -> None:
        self.parts = parts
        self.bytes: collections.Counter[str] = collections.Counter()
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes[self.parts.current] += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_by_part(cfg: CN, batch_size: int, num_classes: int = 171, num_cameras: int = 4) -> collections.Counter[str]:
    """Bytes saved for the backward by each top-level part of ``cfg``'s model and by the loss ("loss"), one
    bf16-autocast training forward of ``batch_size`` samples on the CPU."""
    cfg = with_keys(cfg, {"SOLVER.IMS_PER_BATCH": batch_size, "DEVICE.NAME": "cpu"})
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_reid_model(cfg, num_classes, num_cameras).train()
    objective = ReIDObjective(ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None)), device)
    batch = reid_batch(cfg, device, num_classes, num_cameras, batch_size)
    parts = PartStack(default="model")
    for name, module in model.named_children():
        parts.label(name, module)
    with SavedBytes(parts) as saved:
        with build_amp_policy("bf16", device).autocast():
            outputs = objective.forward(model, batch)
        with parts.part("loss"):
            objective.loss(outputs, batch, 0.0)
    return saved.bytes


def table(small: tuple[int, collections.Counter[str]], large: tuple[int, collections.Counter[str]],
          target: int) -> str:
    """Markdown: per part, the fixed and per-sample MiB fitted through the two batches, and their sum at
    ``target`` samples, largest first."""
    (b1, s1), (b2, s2) = small, large
    rows = []
    for part in set(s1) | set(s2):
        per_sample = (s2[part] - s1[part]) / (b2 - b1)
        fixed = s1[part] - per_sample * b1
        rows.append((part, fixed, per_sample, fixed + per_sample * target))
    rows.sort(key=lambda row: -row[3])
    rows.append(("total", *(sum(row[i] for row in rows) for i in (1, 2, 3))))
    mib = 2**20
    lines = [f"| part | fixed MiB | MiB per sample | MiB at {target} samples |", "|---|---|---|---|"]
    lines += [f"| {p} | {round(f / mib, 1) + 0.0} | {s / mib:.2f} | {t / mib:.1f} |" for p, f, s, t in rows]  # no -0.0
    return "\n".join(lines)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    cfg = load_config(args.config_file, ["DEVICE.NAME", "cpu", *args.opts])
    if is_fewshot(cfg):
        parser.error(f"--task memory measures a ReID forward; {args.config_file} is a few-shot config")
    k = cfg.DATALOADER.NUM_INSTANCE
    b1, b2 = args.batches or (k, 2 * k)
    if b1 == b2 or b1 % k or b2 % k:
        parser.error(f"--batches needs two different multiples of DATALOADER.NUM_INSTANCE ({k}), got {b1} {b2}")
    measured = [(b, saved_by_part(cfg, b, args.num_classes, args.num_cameras)) for b in (b1, b2)]
    print(table(measured[0], measured[1], cfg.SOLVER.IMS_PER_BATCH))
    print(f"\nmeasured at {b1} and {b2} samples (eager, bf16 autocast, CPU); the loss's backward and the model's "
          "parameters, gradients and optimizer state come on top")
    return 0
