#!/usr/bin/env python
"""Executable invariants of the SDM loss (symmetric KL, masked). Exit 1 on the first broken one.

    python verify/verify_sdm.py                          # all checks, exit 0
    python verify/verify_sdm.py --inject-bug old_formula # the `ce - h` formula (sdm_loss_legacy): exits 1

Checks, each printed with its measured value:
  1. non-negativity on 1,000 random batches (Gaussian, near-converged clustered and
     masked batches; inputs in float32, float16 and bfloat16; temperatures 0.03-0.5);
  2. agreement with an independent float64 numpy formula (with and without masks);
  3. float32 result under fp16/bf16 inputs and under CPU bf16 autocast;
  4. masks: masked rows cannot change the loss (even NaN placeholders) and get zero gradient;
  5. no valid pair: loss exactly 0, finite zero gradients, never NaN.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from losses.sdm_loss import sdm_loss, sdm_loss_legacy
from verify.harness import report, run

ROOT = Path(__file__).resolve().parents[1]

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
INJECTED: set[str] = set()


def old_buggy_sdm(feat_a, feat_b, pids, temperature=0.2, mask_a=None, mask_b=None):
    """The ``ce - h`` formula that ``sdm_loss`` corrects (``losses.sdm_loss.sdm_loss_legacy``); ignores masks.

    Used only to show that this script catches it.
    """
    return sdm_loss_legacy(feat_a, feat_b, pids, temperature)


def reference_sdm(a, b, pids, tau, mask_a=None, mask_b=None) -> float:
    """Independent float64 numpy SDM: mean over rows with a valid positive of KL(q || softmax)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    pids = np.asarray(pids).reshape(-1)
    n = len(pids)
    ma = np.ones(n, bool) if mask_a is None else np.asarray(mask_a, bool)
    mb = np.ones(n, bool) if mask_b is None else np.asarray(mask_b, bool)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)

    def direction(x, y, mx, my) -> float:
        kls = []
        for i in np.flatnonzero(mx):
            cols = np.flatnonzero(my)
            pos = cols[pids[cols] == pids[i]]
            if len(pos) == 0:
                continue
            logits = x[i] @ y[cols].T / tau
            lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
            log_p = dict(zip(cols.tolist(), (logits - lse).tolist()))
            q = 1.0 / len(pos)
            kls.append(sum(q * (math.log(q) - log_p[j]) for j in pos.tolist()))
        return float(np.mean(kls)) if kls else 0.0

    return 0.5 * (direction(a, b, ma, mb) + direction(b, a, mb, ma))


def random_batch(gen: torch.Generator, kind: str) -> dict:
    """One random SDM batch of a given family (pids with repeats and singletons)."""
    bsz = int(torch.randint(2, 65, (1,), generator=gen))
    dim = int(torch.randint(2, 33, (1,), generator=gen))
    n_ids = int(torch.randint(1, bsz + 1, (1,), generator=gen))
    pids = torch.randint(0, n_ids, (bsz,), generator=gen)
    tau = float(torch.empty(1).uniform_(0.03, 0.5, generator=gen))
    mask_a = mask_b = None
    if kind == "clustered":  # near convergence: both views at their identity centre, tiny noise
        centres = torch.randn(n_ids, dim, generator=gen)
        noise = float(torch.empty(1).uniform_(0.0, 0.05, generator=gen))
        a = centres[pids] + noise * torch.randn(bsz, dim, generator=gen)
        b = centres[pids] + noise * torch.randn(bsz, dim, generator=gen)
    else:
        a = torch.randn(bsz, dim, generator=gen) * float(torch.empty(1).uniform_(0.1, 20.0, generator=gen))
        b = torch.randn(bsz, dim, generator=gen)
        if kind == "masked":
            mask_a = torch.rand(bsz, generator=gen) > 0.3
            mask_b = torch.rand(bsz, generator=gen) > 0.3
    return {"a": a, "b": b, "pids": pids, "tau": tau, "mask_a": mask_a, "mask_b": mask_b}


def check_non_negative(loss_fn: LossFn) -> None:
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    kinds = ["gaussian", "clustered", "masked"]
    worst, nan_count = math.inf, 0
    for i in range(1000):
        bt = random_batch(gen, kinds[i % 3])
        dt = dtypes[(i // 3) % 3]
        loss, _ = loss_fn(bt["a"].to(dt), bt["b"].to(dt), bt["pids"], bt["tau"], bt["mask_a"], bt["mask_b"])
        v = float(loss)
        if not math.isfinite(v):
            nan_count += 1
        else:
            worst = min(worst, v)
    report("no NaN/Inf on 1,000 random batches (fp32/fp16/bf16 inputs)", nan_count == 0, f"{nan_count} non-finite")
    report("loss >= -1e-6 on 1,000 random batches", worst >= -1e-6, f"min loss = {worst:.3e}")


def check_float64_agreement(loss_fn: LossFn) -> None:
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for i in range(60):
        bt = random_batch(gen, ["gaussian", "clustered", "masked"][i % 3])
        bt["tau"] = max(bt["tau"], 0.15)  # the schedule's range; float32 error grows as 1/tau
        loss, _ = loss_fn(bt["a"], bt["b"], bt["pids"], bt["tau"], bt["mask_a"], bt["mask_b"])
        ref = reference_sdm(bt["a"].numpy(), bt["b"].numpy(), bt["pids"].numpy(), bt["tau"],
                            None if bt["mask_a"] is None else bt["mask_a"].numpy(),
                            None if bt["mask_b"] is None else bt["mask_b"].numpy())
        worst = max(worst, abs(float(loss) - ref) / max(1.0, abs(ref)))
    report("matches the float64 numpy formula on 60 batches (masked included)", worst < 1e-4,
           f"max rel. error = {worst:.2e}")


def check_precision(loss_fn: LossFn) -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    pids = torch.randint(0, 8, (32,), generator=gen)
    ref32, _ = loss_fn(a, b, pids, 0.2)
    half, _ = loss_fn(a.half(), b.half(), pids, 0.2)
    bf, _ = loss_fn(a.bfloat16(), b.bfloat16(), pids, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = loss_fn(a, b, pids, 0.2)
    dtypes = {str(t.dtype) for t in (half, bf, auto)}
    report("float32 output for fp16/bf16 inputs and inside bf16 autocast", dtypes == {"torch.float32"}, f"{sorted(dtypes)}")
    err = max(abs(float(t) - float(ref32)) for t in (half, bf, auto))
    report("half-precision inputs agree with float32 (input rounding only)", err < 2e-2, f"max abs diff = {err:.2e}")


def check_masks(loss_fn: LossFn) -> None:
    gen = torch.Generator().manual_seed(3)
    bsz = 16
    a = torch.randn(bsz, 8, generator=gen)
    b = torch.randn(bsz, 8, generator=gen)
    pids = torch.arange(bsz) // 2
    mask_a = torch.ones(bsz, dtype=torch.bool)
    mask_b = torch.ones(bsz, dtype=torch.bool)
    mask_a[[1, 4, 9]] = False
    mask_b[[0, 4, 12, 13]] = False
    base, _ = loss_fn(a, b, pids, 0.2, mask_a, mask_b)
    a2, b2 = a.clone(), b.clone()
    a2[~mask_a] = float("nan")
    b2[~mask_b] = torch.randn(int((~mask_b).sum()), 8, generator=gen) * 100
    a2.requires_grad_(True)
    b2.requires_grad_(True)
    moved, _ = loss_fn(a2, b2, pids, 0.2, mask_a, mask_b)
    moved.backward()
    diff = abs(moved.item() - base.item())
    report("masked rows (NaN / random placeholders) do not change the loss", diff < 1e-6, f"|diff| = {diff:.2e}")
    g_masked = max(float(a2.grad[~mask_a].abs().max()), float(b2.grad[~mask_b].abs().max()))
    finite = bool(torch.isfinite(a2.grad).all() and torch.isfinite(b2.grad).all())
    report("masked rows get exactly zero, finite gradient", finite and g_masked == 0.0, f"max |grad| = {g_masked}")
    ref = reference_sdm(a.numpy(), b.numpy(), pids.numpy(), 0.2, mask_a.numpy(), mask_b.numpy())
    report("masked loss equals the float64 formula restricted to real pairs", abs(float(base) - ref) < 1e-5,
           f"loss = {float(base):.6f}, reference = {ref:.6f}")


def check_no_valid_pair(loss_fn: LossFn) -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(8, 4, generator=gen, requires_grad=True)
    b = torch.randn(8, 4, generator=gen, requires_grad=True)
    pids = torch.arange(8)
    none = torch.zeros(8, dtype=torch.bool)
    loss, _ = loss_fn(a, b, pids, 0.2, none, none)
    loss.backward()
    value = loss.item()
    ok = value == 0.0 and a.grad is not None and bool(torch.isfinite(a.grad).all()) and float(a.grad.abs().max()) == 0.0
    report("all rows masked: loss 0 with a finite zero gradient", ok, f"loss = {value}, grad = {None if a.grad is None else float(a.grad.abs().max())}")
    # Real rows on both sides but disjoint, so no identity has a real partner: no positive anywhere.
    a.grad = None
    ma = torch.tensor([True] * 4 + [False] * 4)
    loss2, stats = loss_fn(a, b, pids, 0.2, ma, ~ma)
    loss2.backward()
    value2 = loss2.item()
    ok2 = value2 == 0.0 and bool(torch.isfinite(a.grad).all())
    report("real rows without a real positive partner: loss 0, finite gradient", ok2, f"loss = {value2}")


def loss_under_test(*args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """``sdm_loss``, or the ``ce - h`` formula under ``--inject-bug old_formula``."""
    loss_fn: LossFn = old_buggy_sdm if "old_formula" in INJECTED else sdm_loss
    return loss_fn(*args, **kwargs)


CHECKS = [partial(check, loss_under_test)
          for check in (check_non_negative, check_float64_agreement, check_precision, check_masks, check_no_valid_pair)]


def main(argv: list[str] | None = None) -> int:
    # threads=1: tiny tensors, threads only add contention on a shared machine
    return run("verify_sdm", CHECKS, argv, doc=__doc__, bugs=["old_formula"], injected=INJECTED, threads=1,
               bug_help="swap in a known-broken loss to show the script catches it (exits 1)")


if __name__ == "__main__":
    sys.exit(main())
