"""Task ``losses``: CPU cost per call of every loss in ``losses/`` at a ReID-sized batch; prints a table.

For each loss: median and minimum milliseconds of the forward call and of forward + backward over ``--reps``
calls after warm-up (stats conversion included: one host transfer per call). The batch is PK-sampled
(``--ids`` identities x B/ids instances). One thread by default: at these sizes extra intra-op threads gain
little and, on a shared machine, make the timings swing by 10-100x (OpenMP workers waiting for busy cores).
``--gmm`` also fits the GMM reference once per class on one batch (seconds; it is meant for epoch-end use,
not per step).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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
from tools.benchmarks.timing import median_and_min_ms

LossCall = Callable[[], tuple[torch.Tensor, dict]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=32, help="identities per batch (PK sampling)")
    parser.add_argument("--classes", type=int, default=171, help="classifier width for the ID loss")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gmm", action="store_true", help="also time the (slow, offline) GMM reference")


def pk_labels(batch: int, ids: int) -> torch.Tensor:
    """(batch,) identity labels: ``ids`` identities of ``batch // ids`` samples each, topped up with new ones."""
    pids = torch.arange(ids).repeat_interleave(max(1, batch // ids))[:batch]
    if pids.numel() < batch:
        pids = torch.cat([pids, torch.arange(batch - pids.numel())])
    return pids


def loss_cases(pids: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               classes: int) -> list[tuple[str, LossCall]]:
    """Every loss on the (B, D) features ``feats`` (three modalities; leaves that require gradients), random
    (B, ``classes``) logits and modality masks: ``(name, call)``."""
    fa, fb, fc = feats
    b, dim = fa.shape
    logits = torch.randn(b, classes, requires_grad=True)
    masks = torch.rand(b, 3) > 0.2
    cem = GatedAttentionCEM(dim, warmup_epochs=0)
    return [
        ("sdm (one pair)", lambda: sdm_loss(fa, fb, pids, 0.2)),
        ("sdm (one pair, masks)", lambda: sdm_loss(fa, fb, pids, 0.2, masks[:, 0], masks[:, 1])),
        ("sdm_multimodal (3 modalities)", lambda: sdm_multimodal({"RGB": fa, "NI": fb, "TI": fc}, pids, masks)),
        (f"id (C={classes}, eps 0.1)", lambda: id_loss(logits, pids % classes, 0.1)),
        ("triplet (margin 0.3)", lambda: triplet_loss(fa, pids, margin=0.3)),
        ("triplet (soft margin)", lambda: triplet_loss(fa, pids, soft_margin=True)),
        ("feature_norm", lambda: feature_norm_loss(fa)),
        ("cem (GatedAttentionCEM)", lambda: cem(fa, pids)),
    ]


def _with_backward(fn: LossCall) -> Callable[[], None]:
    def run() -> None:
        loss, _ = fn()
        loss.backward()

    return run


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    b = args.batch
    pids = pk_labels(b, args.ids)
    feats = tuple(torch.randn(b, args.dim, requires_grad=True) for _ in range(3))
    cases = loss_cases(pids, feats, args.classes)
    print(f"CPU cost per call: B={b}, D={args.dim}, {args.ids} ids x {b // args.ids}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps}")
    print(f"  {'loss':<34} {'fwd median':>11} {'fwd min':>9} {'fwd+bwd median':>15} {'fwd+bwd min':>12}   (ms)")
    for name, fn in cases:
        fwd, fwd_min = median_and_min_ms(fn, args.reps)
        both, both_min = median_and_min_ms(_with_backward(fn), args.reps)
        print(f"  {name:<34} {fwd:>11.3f} {fwd_min:>9.3f} {both:>15.3f} {both_min:>12.3f}")
    if args.gmm:
        gmm = GMMConditionalEntropy(n_components=1)
        t0 = time.perf_counter()
        gmm(feats[0].detach(), pids)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"  {'cem_gmm reference (1 fit/class)':<34} {ms:>11.1f}   (one call, no backward)")
    return 0
