#!/usr/bin/env python
"""CPU cost per call of every loss in ``losses/`` at a ReID-sized batch; prints a table.

    python tools/bench_losses.py                      # B=128, D=512, 1 thread
    python tools/bench_losses.py --threads 2 --gmm    # 2 intra-op threads, plus the GMM reference
    python tools/bench_losses.py --batch 64 --dim 768 --reps 100

For each loss: median and minimum milliseconds of the forward call and of forward +
backward over ``--reps`` calls after warm-up (stats conversion included: one host transfer per call).
The batch is PK-sampled (``--ids`` identities x B/ids instances). One thread by default:
at these sizes extra intra-op threads gain little and, on a shared machine, make the
timings swing by 10-100x (OpenMP workers waiting for busy cores). ``--gmm`` also fits
the GMM reference once per class on one batch (seconds; it is meant for epoch-end use,
not per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from losses import (
    GatedAttentionCEM,
    GMMConditionalEntropy,
    feature_norm_loss,
    id_loss,
    sdm_loss,
    sdm_multimodal,
    triplet_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 5) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn()`` in milliseconds.

    The minimum is the cost without interference from other processes on a shared
    machine; the median is what a busy machine gives.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=32, help="identities per batch (PK sampling)")
    parser.add_argument("--classes", type=int, default=171, help="classifier width for the ID loss")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gmm", action="store_true", help="also time the (slow, offline) GMM reference")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    b, d = args.batch, args.dim
    pids = torch.arange(args.ids).repeat_interleave(max(1, b // args.ids))[:b]
    if pids.numel() < b:
        pids = torch.cat([pids, torch.arange(b - pids.numel())])

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=True)

    fa, fb, fc = leaf(b, d), leaf(b, d), leaf(b, d)
    logits = leaf(b, args.classes)
    masks = torch.rand(b, 3) > 0.2
    cem = GatedAttentionCEM(d, warmup_epochs=0)

    cases: list[tuple[str, Callable[[], tuple[torch.Tensor, dict]]]] = [
        ("sdm (one pair)", lambda: sdm_loss(fa, fb, pids, 0.2)),
        ("sdm (one pair, masks)", lambda: sdm_loss(fa, fb, pids, 0.2, masks[:, 0], masks[:, 1])),
        ("sdm_multimodal (3 modalities)", lambda: sdm_multimodal({"RGB": fa, "NI": fb, "TI": fc}, pids, masks)),
        (f"id (C={args.classes}, eps 0.1)", lambda: id_loss(logits, pids % args.classes, 0.1)),
        ("triplet (margin 0.3)", lambda: triplet_loss(fa, pids, margin=0.3)),
        ("triplet (soft margin)", lambda: triplet_loss(fa, pids, soft_margin=True)),
        ("feature_norm", lambda: feature_norm_loss(fa)),
        ("cem (GatedAttentionCEM)", lambda: cem(fa, pids)),
    ]

    def with_backward(fn: Callable[[], tuple[torch.Tensor, dict]]) -> Callable[[], None]:
        def run() -> None:
            loss, _ = fn()
            loss.backward()

        return run

    print(f"CPU cost per call: B={b}, D={d}, {args.ids} ids x {b // args.ids}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps}")
    print(f"  {'loss':<34} {'fwd median':>11} {'fwd min':>9} {'fwd+bwd median':>15} {'fwd+bwd min':>12}   (ms)")
    for name, fn in cases:
        fwd, fwd_min = time_ms(fn, args.reps)
        both, both_min = time_ms(with_backward(fn), args.reps)
        print(f"  {name:<34} {fwd:>11.3f} {fwd_min:>9.3f} {both:>15.3f} {both_min:>12.3f}")
    if args.gmm:
        gmm = GMMConditionalEntropy(n_components=1)
        x = fa.detach()
        t0 = time.perf_counter()
        gmm(x, pids)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"  {'cem_gmm reference (1 fit/class)':<34} {ms:>11.1f}   (one call, no backward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
