#!/usr/bin/env python
"""Executable invariants of the conditional-entropy regularisers. Exit 1 on the first broken one.

    python verify/verify_cem.py                              # all checks, exit 0
    python verify/verify_cem.py --inject-bug detach_input    # CEM cut off from the encoder: exits 1

Checks, each printed with its measured value:
  1. gradients of the gated CEM reach the encoder's input and weights and every one of
     the module's own parameters, all finite; ``param_groups()`` holds exactly them;
  2. warm-up: before WARMUP epochs the loss is 0 and still back-propagates (zero grads);
  3. classes with a single sample are skipped, never NaN;
  4. on Gaussian classes with known class-conditional entropy
     H(Z|Y) = D/2 * log(2 pi e sigma^2), both GatedAttentionCEM (fresh, untrained) and
     the GMM reference rank three data sets (sigma 0.5, 1, 2) the same way: larger
     per-class covariance, larger penalty; the GMM's entropy matches the known value
     once the exact small-sample (Wishart) bias of a fitted log-determinant is added;
  5. cost: milliseconds per call at B=128, D=512 (gated forward + backward; GMM fit).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from scipy.special import digamma
from torch import nn

from losses.conditional_entropy import GatedAttentionCEM, GMMConditionalEntropy
from verify.harness import report, run

ROOT = Path(__file__).resolve().parents[1]

INJECTED: set[str] = set()
SIGMAS = [0.5, 1.0, 2.0]


def cem_call(cem: GatedAttentionCEM, feats: torch.Tensor, labels: torch.Tensor, epoch: float | None = None):
    """Call the module, except that ``--inject-bug detach_input`` cuts the encoder's gradient."""
    if "detach_input" in INJECTED:
        feats = feats.detach()
    return cem(feats, labels, epoch=epoch)


def gaussian_classes(sigma: float, n_classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c ~ N(m_c, sigma^2 I) with the same class means m_c ~ N(0, 2^2 I) for every sigma."""
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(n_classes, dim, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    noise = torch.randn(n_classes * per_class, dim, generator=torch.Generator().manual_seed(seed + 1))
    return means[labels] + sigma * noise, labels


def check_ranking() -> None:
    dim, n_classes, per_class = 16, 8, 64
    torch.manual_seed(0)
    cem = GatedAttentionCEM(dim, warmup_epochs=0)
    gmm = GMMConditionalEntropy(n_components=1, tau=0.1)
    gated, gmm_vals, rows = [], [], []
    for sigma in SIGMAS:
        x, y = gaussian_classes(sigma, n_classes, per_class, dim, seed=10)
        known = 0.5 * dim * math.log(2 * math.pi * math.e * sigma**2)
        # Gated CEM on PK mini-batches of 8 classes x 16 samples, averaged over the 4 batches.
        vals = []
        for k in range(4):
            idx = torch.cat([torch.arange(c * per_class + 16 * k, c * per_class + 16 * (k + 1)) for c in range(n_classes)])
            with torch.no_grad():
                vals.append(cem(x[idx], y[idx])[1]["cem_surrogate"])
        g = sum(vals) / len(vals)
        value, stats = gmm(x, y)
        est_entropy = 0.5 * stats["cem_gmm_logdet"] + 0.5 * dim * math.log(2 * math.pi * math.e)
        gated.append(g)
        gmm_vals.append(value)
        rows.append((sigma, known, est_entropy, value, g))
    print(f"  {'sigma':>5} {'H(Z|Y) known':>13} {'GMM entropy':>12} {'GMM penalty':>12} {'gated CEM':>10}")
    for sigma, known, est, value, g in rows:
        print(f"  {sigma:>5.2f} {known:>13.3f} {est:>12.3f} {value:>12.3f} {g:>10.4f}")
    report("GMM reference: larger per-class covariance -> larger penalty",
           all(a < b for a, b in zip(gmm_vals, gmm_vals[1:])), f"{[round(v, 3) for v in gmm_vals]}")
    report("gated CEM ranks the three data sets the same way",
           all(a < b for a, b in zip(gated, gated[1:])), f"{[round(v, 4) for v in gated]}")
    # A Gaussian fitted by maximum likelihood to n samples has E[logdet S] = logdet Sigma +
    # sum_{i=1..D} digamma((n - i) / 2) + D log(2 / n) (Wishart); half of it is the entropy bias.
    bias = 0.5 * (sum(float(digamma((per_class - i) / 2)) for i in range(1, dim + 1)) + dim * math.log(2 / per_class))
    worst = max(abs(est - (known + bias)) for _, known, est, _, _ in rows)
    report("GMM entropy = known H(Z|Y) + Wishart small-sample bias, within 0.3 nats", worst < 0.3,
           f"bias {bias:.3f} nats, max |error| {worst:.3f} nats")


def check_gradients() -> None:
    torch.manual_seed(1)
    dim = 32
    encoder = nn.Sequential(nn.Linear(24, dim), nn.GELU(), nn.Linear(dim, dim))
    cem = GatedAttentionCEM(dim, warmup_epochs=0)
    inputs = torch.randn(64, 24, requires_grad=True)
    labels = torch.arange(8).repeat_interleave(8)
    loss, _ = cem_call(cem, encoder(inputs), labels)
    loss.backward()
    g_in = 0.0 if inputs.grad is None else float(inputs.grad.abs().sum())
    g_enc = sum(0.0 if p.grad is None else float(p.grad.abs().sum()) for p in encoder.parameters())
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in [*encoder.parameters(), *cem.parameters()])
    report("gradient reaches the encoder input and weights", g_in > 0 and g_enc > 0 and finite,
           f"sum |grad| input {g_in:.3e}, encoder {g_enc:.3e}")
    own = {n: (0.0 if p.grad is None else float(p.grad.abs().sum())) for n, p in cem.named_parameters()}
    zero = [n for n, v in own.items() if not v > 1e-8]
    report("gradient reaches every parameter of the CEM module", not zero and finite,
           f"{len(own)} tensors, min sum |grad| {min(own.values()):.3e}" + (f", zero: {zero}" if zero else ""))
    groups = cem.param_groups(lr=1e-4)
    n_group = sum(p.numel() for g in groups for p in g["params"])
    report("param_groups() holds exactly the module's parameters",
           n_group == sum(p.numel() for p in cem.parameters()) and groups[0]["lr"] == 1e-4,
           f"{len(groups)} group(s), {n_group} parameters")


def check_warmup() -> None:
    torch.manual_seed(2)
    cem = GatedAttentionCEM(16, warmup_epochs=5)
    x = torch.randn(32, 16, requires_grad=True)
    y = torch.arange(4).repeat_interleave(8)
    loss, stats = cem_call(cem, x, y, epoch=2)
    loss.backward()
    ok = loss.item() == 0.0 and x.grad is not None and float(x.grad.abs().max()) == 0.0
    report("epoch 2 < warm-up 5: loss 0 that back-propagates zero gradients", ok,
           f"loss {loss.item()}, surrogate still logged {stats['cem_surrogate']:.4f}")
    loss5, stats5 = cem_call(cem, x, y, epoch=5)
    report("epoch 5: loss = loss_scale * surrogate", abs(loss5.item() - 0.1 * stats5["cem_surrogate"]) < 1e-6,
           f"loss {loss5.item():.5f}, surrogate {stats5['cem_surrogate']:.5f}")


def check_singletons() -> None:
    torch.manual_seed(3)
    cem = GatedAttentionCEM(16, warmup_epochs=0)
    x = torch.randn(12, 16, requires_grad=True)
    loss, stats = cem_call(cem, x, torch.arange(12))
    loss.backward()
    report("all classes with one sample: loss 0, finite gradient",
           loss.item() == 0.0 and bool(torch.isfinite(x.grad).all()), f"loss {loss.item()}, classes used {stats['cem_classes']:.0f}")
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7])
    loss2, stats2 = cem_call(cem, x, y)
    report("singleton classes skipped next to real ones", math.isfinite(loss2.item()) and stats2["cem_classes"] == 2,
           f"loss {loss2.item():.5f}, classes used {stats2['cem_classes']:.0f}")


def check_cost() -> None:
    torch.manual_seed(4)
    b, d = 128, 512
    x = torch.randn(b, d, requires_grad=True)
    y = torch.arange(32).repeat_interleave(4)
    cem = GatedAttentionCEM(d, warmup_epochs=0)
    for _ in range(3):
        cem(x, y)[0].backward()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        cem(x, y)[0].backward()
    gated_ms = (time.perf_counter() - t0) / reps * 1e3
    gmm = GMMConditionalEntropy(n_components=1)
    y8 = torch.arange(8).repeat_interleave(16)  # fewer, larger classes: a GMM fit per class dominates
    t0 = time.perf_counter()
    gmm(x.detach(), y8)
    gmm_ms = (time.perf_counter() - t0) * 1e3
    report("gated CEM cost per batch (B=128, D=512, 32 classes, forward+backward, CPU)", gated_ms < 1000,
           f"{gated_ms:.2f} ms")
    report("GMM reference cost on a batch of B=128, D=512, 8 classes (one fit per class, CPU)",
           math.isfinite(gmm_ms), f"{gmm_ms:.1f} ms")


CHECKS = [check_gradients, check_warmup, check_singletons, check_ranking, check_cost]


def main(argv: list[str] | None = None) -> int:
    # threads=1: tiny tensors, threads only add contention on a shared machine
    return run("verify_cem", CHECKS, argv, doc=__doc__, bugs=["detach_input"], injected=INJECTED, threads=1,
               bug_help="detach the features before the CEM to show the script catches it (exits 1)")


if __name__ == "__main__":
    sys.exit(main())
