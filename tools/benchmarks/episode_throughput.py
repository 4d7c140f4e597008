"""Few-shot (ExpB1 + SAP) episode throughput and peak memory, per phase and shot, on random images.

* ``train``: one training episode through the trainer's step (:mod:`.train_step`): the ``meta`` stage's
  forward, cross-entropy, backward, clipping and optimizer step;
* ``eval (forward)``: one episode's full forward under ``no_grad`` (backbone on every image);
* ``eval (cached)``: the episode head on pre-computed features, as test episodes run (2,000 per setting)
  after one backbone pass over the split; ten times the calls of the other phases.

Peak memory is measured per phase (reset after its warm-up), in MiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from yacs.config import CfgNode as CN

from tools.benchmarks.timing import peak_memory, repeat, reset_peak_memory, seconds_per_call
from tools.benchmarks.train_step import TrainStep, build_train_step


def _timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(episodes/s, peak MiB) of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    repeat(fn, warmup, device)
    reset_peak_memory(device)
    seconds = seconds_per_call(fn, iters, device)
    return 1.0 / seconds, peak_memory(device, unit=2**20)


def episode_rows(cfg: CN, precision: str, device: torch.device, *, shots: list[int], parts: set[str], iters: int,
                 warmup: int, compiled: bool = False) -> list[dict]:
    """One row per (phase of ``parts``, shot): episodes/s, images/s and peak memory; a fresh model per shot."""
    rows = []
    for k in shots:
        step = build_train_step(cfg, precision, device, compiled, k_shot=k)
        rows += _shot_rows(step, device, k, parts, iters, warmup)
    return rows


def _phases(step: TrainStep, parts: set[str]) -> list[tuple[str, Callable[[], object], int]]:
    """``(phase, one call, calls per iteration)`` of the asked parts."""
    model, amp, b = step.eval_model, step.amp, step.batch
    phases: list[tuple[str, Callable[[], object], int]] = []
    if "train" in parts:
        phases.append(("train", step, 1))
    if "eval" in parts:
        step.model.eval()
        with torch.no_grad(), amp.autocast():
            f_s, f_q = step.model.backbone(b["support"]).float(), step.model.backbone(b["query"]).float()

        @torch.no_grad()
        def eval_forward() -> None:
            with amp.autocast():
                model(b["support"], b["support_labels"], b["query"], b["class_ids"])

        @torch.no_grad()
        def eval_cached() -> None:
            step.model.episode_logits(f_s, b["support_labels"], f_q, b["class_ids"], n_way=len(b["class_ids"]))

        phases += [("eval (forward)", eval_forward, 1), ("eval (cached)", eval_cached, 10)]
    return phases


def _shot_rows(step: TrainStep, device: torch.device, k: int, parts: set[str], iters: int, warmup: int) -> list[dict]:
    n, q = len(step.batch["class_ids"]), len(step.batch["query_labels"]) // len(step.batch["class_ids"])
    size = step.batch["query"].shape[-1]
    rows = []
    for phase, fn, factor in _phases(step, parts):
        step.model.train(phase == "train")  # the bare module: its compiled wrappers follow it
        eps, peak = _timed(fn, iters * factor, warmup, device)
        step.finish()
        rows.append(dict(phase=phase, way=n, shot=k, query=q, image_size=size, episodes_per_s=eps,
                         images_per_s=eps * n * (k + q) if phase != "eval (cached)" else math.nan, peak_mib=peak))
    return rows


def text_table(cfg: CN, rows: list[dict], device_label: str, precision: str) -> str:
    """The rows as the plain-text table this task prints, under a line naming model, device and precision."""
    lines = [f"ExpB1 ({cfg.MODEL.BACKBONE} {list(cfg.MODEL.BACKBONE_ARGS.CHANNELS)}, SAP {cfg.MODEL.SAP.ENABLED}) "
             f"on {device_label}, precision {precision}, torch {torch.__version__}",
             f"{'phase':<16}{'episode':>16}{'episodes/s':>12}{'images/s':>11}{'peak MiB':>10}"]
    for r in rows:
        ep = f"{r['way']}w{r['shot']}s{r['query']}q@{r['image_size']}"
        lines.append(f"{r['phase']:<16}{ep:>16}{r['episodes_per_s']:>12.2f}{r['images_per_s']:>11.0f}"
                     f"{r['peak_mib']:>10.0f}")
    return "\n".join(lines)
