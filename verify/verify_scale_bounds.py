#!/usr/bin/env python
"""Executable invariants of bounded learnable scales (BoundedScale). Exit 1 on the first broken one.

    python verify/verify_scale_bounds.py                       # all checks, exit 0
    python verify/verify_scale_bounds.py --inject-bug no_clamp # 'clamp' silently unbounded: exits 1

Prints the saturation table (weights [0, 0.8, -0.6, 0.3], scales 1, 2.5, 5, 10, 20:
attention = softmax(weights * scale), its entropy against log 4 = 1.386, its max),
computed here, then checks that
  1. every constraint mode keeps the scale inside its bounds over 1,000 optimizer
     steps of a loss that pushes the scale up (penalty mode: at the predicted
     equilibrium init + g / (2 coef), below the bound, with no hard bound at all);
  2. at the upper bound `clamp` passes no gradient while `sigmoid` still does, so only
     `sigmoid` can come back down when the loss reverses;
  3. the penalty is coef * (scale - init)^2 (quadratic growth, exact values);
  4. AttentionBiasGenerator: bias = clamp(weights * scale, -5, 5), scale in [0.5, 5],
     and the warning past 4.0 is logged, rate-limited.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from modeling.layers import AttentionBiasGenerator, BoundedScale
from verify.harness import report, run

ROOT = Path(__file__).resolve().parents[1]

WEIGHTS = [0.0, 0.8, -0.6, 0.3]
SCALES = [1.0, 2.5, 5.0, 10.0, 20.0]
INJECTED: set[str] = set()


def make_scale(init: float, lo: float | None, hi: float | None, constraint: str, **kw) -> BoundedScale:
    """BoundedScale, except that ``--inject-bug no_clamp`` turns 'clamp' into an unbounded scale."""
    if constraint == "clamp" and "no_clamp" in INJECTED:
        constraint = "none"
    return BoundedScale(init, min_value=lo, max_value=hi, constraint=constraint, **kw)


def saturation_table() -> None:
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    log4 = math.log(4.0)
    print(f"saturation table: weights {WEIGHTS}; entropy of a uniform 4-way softmax = log 4 = {log4:.3f}")
    print(f"  {'scale':>5}  {'attention':<34} {'entropy':>7} {'/log4':>6} {'max':>6}")
    rows = []
    for s in SCALES:
        p = torch.softmax(w * s, dim=0)
        ent = float(-(p * p.log()).sum())
        rows.append((s, ent, float(p.max())))
        att = "[" + ", ".join(f"{v:.3f}" for v in p.tolist()) + "]"
        print(f"  {s:>5.1f}  {att:<34} {ent:>7.3f} {ent / log4:>6.2f} {float(p.max()):>6.3f}")
    ents = [r[1] for r in rows]
    maxes = [r[2] for r in rows]
    report("entropy falls and max rises monotonically with the scale",
           all(x > y for x, y in zip(ents, ents[1:])) and all(x < y for x, y in zip(maxes, maxes[1:])),
           f"entropy {ents[0]:.3f} -> {ents[-1]:.3f}, max {maxes[0]:.3f} -> {maxes[-1]:.3f}")
    report("scale 1 is near uniform, scale 20 near one-hot", ents[0] > 0.9 * log4 and maxes[-1] > 0.99,
           f"entropy(1) = {ents[0]:.3f}, max(20) = {maxes[-1]:.4f}")


def push_up(scale: BoundedScale, steps: int = 1000, lr: float = 0.05) -> tuple[float, float]:
    """Adam on loss = -scale (+ penalty): returns (max, last) effective value over the steps."""
    opt = torch.optim.Adam(scale.parameters(), lr=lr)
    vmax = -math.inf
    for _ in range(steps):
        opt.zero_grad()
        s = scale()
        (-(s.sum()) + scale.penalty()).backward()
        opt.step()
        vmax = max(vmax, float(scale.value().max()))
    return vmax, float(scale.value().max())


def check_bounds_under_pressure() -> None:
    lo, hi = 0.5, 5.0
    cases = [
        ("clamp, log", dict(constraint="clamp", parameterization="log")),
        ("clamp, raw", dict(constraint="clamp", parameterization="raw")),
        ("sigmoid, log", dict(constraint="sigmoid", parameterization="log")),
        ("sigmoid, raw", dict(constraint="sigmoid", parameterization="raw")),
        ("penalty + clamp backstop, raw", dict(constraint="penalty", parameterization="raw", penalty_coef=0.01)),
        ("clamp, per-head (4,)", dict(constraint="clamp", parameterization="log", shape=(4,))),
    ]
    for name, kw in cases:
        constraint = kw.pop("constraint")
        scale = make_scale(2.5, lo, hi, constraint, **kw)
        vmax, last = push_up(scale)
        report(f"{name}: scale stays in [{lo}, {hi}] over 1,000 upward Adam steps", lo <= last and vmax <= hi,
               f"max seen {vmax:.4f}, final {last:.4f}, at_bound {scale.stats()['at_bound']:.2f}")
    # Penalty alone (no hard bound anywhere): plain SGD settles where 1 = 2 coef (s - init).
    coef, init = 0.1, 2.5
    scale = BoundedScale(init, constraint="penalty", parameterization="raw", penalty_coef=coef)
    opt = torch.optim.SGD(scale.parameters(), lr=0.05)
    vmax = -math.inf
    for _ in range(1000):
        opt.zero_grad()
        (-scale() + scale.penalty()).backward()
        opt.step()
        vmax = max(vmax, float(scale.value()))
    expected = init + 1.0 / (2.0 * coef)
    final = float(scale.value())
    report("penalty only (no bounds): settles at init + 1 / (2 coef) and never beyond",
           abs(final - expected) < 1e-2 and vmax <= expected + 1e-3,
           f"final {final:.4f}, predicted {expected:.4f}, max seen {vmax:.4f}")


def check_gradient_at_bound() -> None:
    lo, hi = 0.5, 5.0
    grads = {}
    recovered = {}
    for constraint in ("clamp", "sigmoid"):
        scale = make_scale(2.5, lo, hi, constraint)
        push_up(scale)
        scale.zero_grad()
        scale().backward()  # d scale / d parameter at the bound
        grads[constraint] = float(scale.raw.grad.abs())
        # Reverse the loss: it now wants the scale smaller. Can the scale come back?
        at_top = float(scale.value())
        opt = torch.optim.Adam(scale.parameters(), lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            scale().backward()
            opt.step()
        recovered[constraint] = (at_top, float(scale.value()))
    report("clamp: zero gradient once the scale sits at the bound", grads["clamp"] == 0.0,
           f"|d scale / d p| = {grads['clamp']:.3e}")
    report("sigmoid: non-zero gradient at the same place", grads["sigmoid"] > 0.0,
           f"|d scale / d p| = {grads['sigmoid']:.3e}")
    c0, c1 = recovered["clamp"]
    s0, s1 = recovered["sigmoid"]
    report("after the loss reverses, sigmoid comes back down while clamp stays stuck",
           s1 < s0 - 0.5 and abs(c1 - c0) < 1e-6,
           f"sigmoid {s0:.3f} -> {s1:.3f}, clamp {c0:.3f} -> {c1:.3f} (100 Adam steps)")


def check_penalty_growth() -> None:
    coef, init = 0.01, 2.5
    scale = BoundedScale(init, constraint="penalty", parameterization="raw", penalty_coef=coef)
    values = []
    for d in (0.5, 1.0, 2.0, 4.0):
        scale.set_value(init + d)
        values.append((d, scale.penalty().item()))
    exact = all(abs(p - coef * d * d) < 1e-6 for d, p in values)
    ratios = [values[i + 1][1] / values[i][1] for i in range(len(values) - 1)]
    table = ", ".join(f"d={d:g}: {p:.4f}" for d, p in values)
    report("penalty = coef * (scale - init)^2 (coef 0.01)", exact, table)
    report("doubling the distance quadruples the penalty", all(abs(r - 4.0) < 1e-4 for r in ratios),
           "ratios " + ", ".join(f"{r:.4f}" for r in ratios))
    other = make_scale(2.5, 0.5, 5.0, "clamp")
    other.set_value(4.5)
    report("no penalty outside penalty mode", float(other.penalty()) == 0.0, f"clamp penalty = {float(other.penalty())}")


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def check_attention_bias() -> None:
    gen = AttentionBiasGenerator(bias_scale=2.5, learnable_scale=True, min_scale=0.5, max_scale=5.0,
                                 warn_threshold=4.0, warn_every=50)
    if "no_clamp" in INJECTED:
        gen.scale.constraint = "none"
    w = torch.tensor(WEIGHTS + [1.0, -1.0])
    bias = gen(w).detach()
    expected = (w * 2.5).clamp(-5, 5)
    report("bias = weights * 2.5 at init", torch.allclose(bias, expected), f"{[round(v, 3) for v in bias.tolist()]}")
    gen.scale.set_value(50.0)  # a runaway value: the scale clamps at 5, the bias at +-5
    bias = gen(w).detach()
    report("scale set to 50 -> effective 5.0, bias within [-5, 5]",
           abs(float(gen.scale.value()) - 5.0) < 1e-5 and float(bias.abs().max()) <= 5.0,
           f"scale {float(gen.scale.value()):.3f}, max |bias| {float(bias.abs().max()):.3f}")
    counter = _Count()
    log = logging.getLogger("modeling.layers.bounded_scale")
    log.addHandler(counter)
    try:
        for _ in range(200):
            gen(w)
    finally:
        log.removeHandler(counter)
    report("warning past 4.0 logged, rate-limited (200 calls, every 50 -> 4)", counter.n == 4, f"{counter.n} warnings")


CHECKS = [saturation_table, check_bounds_under_pressure, check_gradient_at_bound, check_penalty_growth,
          check_attention_bias]


def main(argv: list[str] | None = None) -> int:
    # threads=1: tiny tensors, threads only add contention on a shared machine
    return run("verify_scale_bounds", CHECKS, argv, doc=__doc__, bugs=["no_clamp"], injected=INJECTED, threads=1,
               bug_help="make 'clamp' scales unbounded to show the script catches it (exits 1)")


if __name__ == "__main__":
    sys.exit(main())
