#!/usr/bin/env python
"""Episode throughput of ExpB1 (+ SAP): train and eval episodes/s and peak GPU memory.

    python tools/benchmark_fewshot.py --config_file configs/miniImageNet/ExpB1_SAP.yml [--shots 1 5] \
        [--iters 50 --warmup 10] [--json out.json] [KEY VALUE ...]

Measures the model on random images of ``FEWSHOT.IMAGE_SIZE`` (no data set needed), with the
config's device and AMP policy, for N-way K-shot episodes with ``FEWSHOT.N_QUERY`` queries:

* ``train``: forward + cross-entropy + backward + gradient clipping + SGD step from
  ``model.get_parameters()`` (one training episode);
* ``eval (forward)``: one episode's full forward under ``no_grad`` (backbone on every image);
* ``eval (cached)``: the episode head on pre-computed features, as :mod:`engine.fewshot_eval`
  runs test episodes (2,000 per setting) after one backbone pass over the split.

CUDA timings synchronise before reading the clock; peak memory is
``torch.cuda.max_memory_allocated`` per phase (reset before each). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.device import build_amp_policy, resolve_device
from engine.solver import build_optimizer
from modeling import build_model

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(episodes/s, peak MiB) of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return iters / elapsed, peak


def benchmark(cfg, shots: list[int], iters: int, warmup: int) -> list[dict]:
    """One row per (phase, shot): episodes/s and peak memory."""
    device = resolve_device(cfg.DEVICE.NAME)
    amp = build_amp_policy(cfg.DEVICE.PRECISION, device)
    model = build_model(cfg).to(device)
    s = cfg.SOLVER
    optimizer = build_optimizer(model.get_parameters(), s.OPTIMIZER, lr=1e-6, weight_decay=s.WEIGHT_DECAY,
                                momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    rows = []
    for k in shots:
        rows += _bench_shot(cfg, model, optimizer, amp, device, k, iters, warmup)
    return rows


def _bench_shot(cfg, model, optimizer, amp, device: torch.device, k: int, iters: int, warmup: int) -> list[dict]:
    fs, s = cfg.FEWSHOT, cfg.SOLVER
    n, q, size = fs.N_WAY, fs.N_QUERY, fs.IMAGE_SIZE
    params = [p for g in optimizer.param_groups for p in g["params"]]
    support = torch.randn(n * k, 3, size, size, device=device)
    query = torch.randn(n * q, 3, size, size, device=device)
    s_lab = torch.arange(n, device=device).repeat_interleave(k)
    q_lab = torch.arange(n, device=device).repeat_interleave(q)
    class_ids = torch.arange(n, device=device)

    def train_step() -> None:
        model.train()
        with amp.autocast():
            logits, _ = model(support, s_lab, query, class_ids)
        loss = F.cross_entropy(logits.float(), q_lab)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, s.GRAD_CLIP if s.GRAD_CLIP > 0 else math.inf)
        amp.scaler.step(optimizer)
        amp.scaler.update()

    @torch.no_grad()
    def eval_forward() -> None:
        model.eval()
        with amp.autocast():
            model(support, s_lab, query, class_ids)

    model.eval()
    with torch.no_grad(), amp.autocast():
        f_s, f_q = model.backbone(support).float(), model.backbone(query).float()

    @torch.no_grad()
    def eval_cached() -> None:
        model.episode_logits(f_s, s_lab, f_q, class_ids, n_way=n)

    rows = []
    for phase, fn, its in (("train", train_step, iters), ("eval (forward)", eval_forward, iters),
                           ("eval (cached)", eval_cached, iters * 10)):
        eps, peak = _timed(fn, its, warmup, device)
        rows.append(dict(phase=phase, way=n, shot=k, query=q, image_size=size, episodes_per_s=eps,
                         images_per_s=eps * n * (k + q) if phase != "eval (cached)" else math.nan, peak_mib=peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", default=str(ROOT / "configs" / "miniImageNet" / "ExpB1_SAP.yml"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    torch.manual_seed(0)
    device = resolve_device(cfg.DEVICE.NAME)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = benchmark(cfg, args.shots, args.iters, args.warmup)
    print(f"ExpB1 ({cfg.MODEL.BACKBONE} {list(cfg.MODEL.BACKBONE_ARGS.CHANNELS)}, SAP {cfg.MODEL.SAP.ENABLED}) "
          f"on {name}, precision {cfg.DEVICE.PRECISION}, torch {torch.__version__}")
    print(f"{'phase':<16}{'episode':>16}{'episodes/s':>12}{'images/s':>11}{'peak MiB':>10}")
    for r in rows:
        ep = f"{r['way']}w{r['shot']}s{r['query']}q@{r['image_size']}"
        print(f"{r['phase']:<16}{ep:>16}{r['episodes_per_s']:>12.2f}{r['images_per_s']:>11.0f}{r['peak_mib']:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
