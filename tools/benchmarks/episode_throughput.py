"""Few-shot (ExpB1 + SAP) episode throughput and peak memory, per phase and shot, on random images.

* ``pretrain``: one pre-training batch through the trainer's step (:mod:`.train_step`), the ``pretrain``
  stage's forward, cross-entropy, backward, clipping and optimizer step (images/s: samples/s);
* ``train``: one training episode through the trainer's step: the ``meta`` stage's;
* ``eval (forward)``: one episode's full forward under ``no_grad`` (backbone on every image);
* ``eval (cached)``: the episode head on pre-computed features, as test episodes run (2,000 per setting)
  after one backbone pass over the split; ten times the calls of the other phases;
* ``test (N ep.)``: the whole test of one shot: the backbone over the split (images/s of that pass), then the N
  episodes (episodes/s of the whole).

Peak memory is measured per phase (reset after its warm-up), in MiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from yacs.config import CfgNode as CN

from tools.benchmarks.timing import peak_memory, repeat, reset_peak_memory, seconds_per_call
from tools.benchmarks.train_step import TrainStep, build_train_step

#: images per class of the timed test's stand-in split (miniImageNet's test split: 20 classes of 600)
TEST_IMAGES_PER_CLASS = 600


def _timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(episodes/s, peak MiB) of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    repeat(fn, warmup, device)
    reset_peak_memory(device)
    seconds = seconds_per_call(fn, iters, device)
    return 1.0 / seconds, peak_memory(device, unit=2**20)


def episode_rows(cfg: CN, precision: str, device: torch.device, *, shots: list[int], parts: set[str], iters: int,
                 warmup: int, compiled: bool = False, test_images: int = 12000, test_episodes: int = 2000
                 ) -> list[dict]:
    """One row per (phase of ``parts``, shot): episodes/s, images/s and peak memory; a fresh model per shot.
    ``train`` adds the pre-training step first (a batch of ``FEWSHOT.PRETRAIN.BATCH_SIZE``); ``eval`` adds the
    whole test of ``test_episodes`` episodes per shot over a split of ``test_images`` images (miniImageNet's:
    12,000), timed as it runs: one backbone pass over the split, then the episodes on its features."""
    rows = []
    if "train" in parts:
        step = build_train_step(cfg, precision, device, compiled, stage="pretrain")
        step.model.train()
        steps_per_s, peak = _timed(step, iters, warmup, device)
        step.finish()
        n, size = step.batch["images"].shape[0], step.batch["images"].shape[-1]
        rows.append(dict(phase="pretrain", way=0, shot=0, query=n, image_size=size, episodes_per_s=steps_per_s,
                         images_per_s=steps_per_s * n, peak_mib=peak))
    for k in shots:
        step = build_train_step(cfg, precision, device, compiled, k_shot=k)
        rows += _shot_rows(step, device, k, parts, iters, warmup)
        if "eval" in parts:
            rows.append(_test_row(step, cfg, device, k, iters, warmup, test_images, test_episodes))
    return rows


def _test_row(step: TrainStep, cfg: CN, device: torch.device, k: int, iters: int, warmup: int, n_images: int,
              n_episodes: int) -> dict:
    """The whole test of one shot as the evaluator runs it: the backbone over ``n_images`` in batches of
    ``TEST.IMS_PER_BATCH`` (timed on one batch), then ``n_episodes`` fixed-seed episodes on the features
    (:func:`engine.fewshot.evaluator.evaluate_episodes`, timed whole)."""
    from engine.fewshot.evaluator import evaluate_episodes

    fs, batch = cfg.FEWSHOT, cfg.TEST.IMS_PER_BATCH
    size = step.batch["query"].shape[-1]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    step.model.eval()

    @torch.no_grad()
    def backbone() -> None:
        with step.amp.autocast():
            step.model.backbone(images)

    batches_per_s, peak = _timed(backbone, max(1, iters // 3), warmup, device)
    classes = max(fs.TEST_WAY, n_images // TEST_IMAGES_PER_CLASS)
    labels = torch.arange(classes, device=device).repeat_interleave(math.ceil(n_images / classes))[:n_images]
    feats = torch.randn(len(labels), step.model.phy_dim, device=device)
    shape = dict(n_way=fs.TEST_WAY, k_shot=k, n_query=fs.TEST_QUERY, seed=fs.EVAL_SEED)
    evaluate_episodes(step.model, feats, labels, n_episodes=10, desc="warm-up", **shape)
    episodes_seconds = seconds_per_call(lambda: evaluate_episodes(step.model, feats, labels, n_episodes=n_episodes,
                                                                   desc="test", **shape), 1, device)
    backbone_seconds = n_images / (batches_per_s * batch)
    seconds = backbone_seconds + episodes_seconds
    return dict(phase=f"test ({n_episodes} ep.)", way=fs.TEST_WAY, shot=k, query=fs.TEST_QUERY, image_size=size,
                episodes_per_s=n_episodes / seconds, images_per_s=batches_per_s * batch, peak_mib=peak,
                test_seconds=seconds, backbone_seconds=backbone_seconds)


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
        ep = f"{r['way']}w{r['shot']}s{r['query']}q@{r['image_size']}" if r["way"] else \
            f"batch {r['query']}@{r['image_size']}"
        lines.append(f"{r['phase']:<16}{ep:>16}{r['episodes_per_s']:>12.2f}{r['images_per_s']:>11.0f}"
                     f"{r['peak_mib']:>10.0f}")
    return "\n".join(lines)
