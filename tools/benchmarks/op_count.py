"""Task ``ops``: operations one ReID training step dispatches, per part of the model: what an eager GPU step
pays kernel launches for.

The eager step on a GPU is bound by kernel launches (BENCHMARKS.md), and launches follow the number of
operations, whatever the machine. This runs the configured model's training step (:mod:`.train_step`, the
trainer's own step) once on the CPU (batch 8 at 64x32: the count does not depend on sizes) and counts the
aten operations it dispatches, split by the model's top-level parts, the loss, gradient clipping and the
optimizer, forward and backward. View operations (reshape, transpose, ...), which launch nothing on a GPU,
are counted apart. The optimizer's count is the CPU one; on a GPU AdamW is fused into a few kernels.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from yacs.config import CfgNode as CN

from engine.config import load_config
from tools.benchmarks.train_step import build_train_step, is_fewshot

#: sizes that change no count, only the time
SMALL = ["SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "4", "INPUT.SIZE_TRAIN", "[64, 32]",
         "INPUT.SIZE_TEST", "[64, 32]", "DEVICE.NAME", "cpu"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


def is_view(func) -> bool:
    """Whether an aten operation only makes a new view of a tensor (no kernel on a GPU): torch's own flag, plus
    ``_unsafe_view``, which ``reshape`` lowers to and which torch does not flag."""
    return func.is_view or func is torch.ops.aten._unsafe_view.default


class PartStack:
    """Which labelled part of a model is running: labelled modules' forwards and :meth:`part` blocks push their
    name, and ``current`` is the innermost (``default`` outside all of them)."""

    def __init__(self, default: str = "other") -> None:
        self.names = [default]

    @property
    def current(self) -> str:
        return self.names[-1]

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Attribute what runs inside to ``name``."""
        self.names.append(name)
        try:
            yield
        finally:
            self.names.pop()

    def label(self, name: str, module: torch.nn.Module) -> None:
        """Attribute ``module``'s forward to ``name`` (its backward runs outside any label)."""
        def enter(_module, _inputs) -> None:
            self.names.append(name)

        def leave(_module, _inputs, _output) -> None:  # returns None: the output stays the module's
            self.names.pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operations by (part, "forward"/"backward", is a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = PartStack()
        self.label, self.part = self.parts.label, self.parts.part
        self.counts: collections.Counter[tuple[str, str, bool]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        self.counts[(self.parts.current, phase, is_view(func))] += 1
        return func(*args, **(kwargs or {}))


def count_step(cfg: CN, num_classes: int = 4, num_cameras: int = 2) -> collections.Counter[tuple[str, str, bool]]:
    """Operation counts of one training step of ``cfg``'s ReID model on the CPU (after one uncounted step)."""
    step = build_train_step(cfg, "fp32", torch.device("cpu"), num_classes=num_classes, num_cameras=num_cameras)
    counter = OpCounter()
    for name, module in step.model.named_children():
        counter.label(name, module)
    counter.label("loss", step.stage.objective.criterion)
    optimizer = step.stage.optimizer
    optimizer.register_step_pre_hook(lambda *_: counter.parts.names.append("optimizer"))
    optimizer.register_step_post_hook(lambda *_: None if counter.parts.names.pop() else None)
    clip = torch.nn.utils.clip_grad_norm_

    def labelled_clip(*a, **k):
        with counter.part("clip"):
            return clip(*a, **k)

    step()
    torch.nn.utils.clip_grad_norm_ = labelled_clip
    try:
        with counter:
            step()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return counter.counts


def table(counts: collections.Counter[tuple[str, str, bool]]) -> str:
    """Markdown: per part, forward and backward operations that are not views (views in brackets)."""
    parts = sorted({p for p, _, _ in counts}, key=lambda p: -sum(v for (q, _, _), v in counts.items() if q == p))
    lines = ["| part | forward | backward |", "|---|---|---|"]
    for part in [*parts, "total"]:
        cells = []
        for phase in ("forward", "backward"):
            ops = sum(v for (p, f, view), v in counts.items() if f == phase and not view and part in (p, "total"))
            views = sum(v for (p, f, view), v in counts.items() if f == phase and view and part in (p, "total"))
            cells.append(f"{ops} ({views})")
        lines.append(f"| {part} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if is_fewshot(load_config(args.config_file, ["DEVICE.NAME", "cpu", *args.opts])):
        parser.error(f"--task ops counts a ReID step; {args.config_file} is a few-shot config")
    cfg = load_config(args.config_file, [*SMALL, *args.opts])
    print(table(count_step(cfg)))
    print("\nbackward operations are attributed to 'other'; the optimizer's are the CPU ones (fused on a GPU)")
    return 0
