#!/usr/bin/env python
"""Executable invariants of SAP's learnable, bounded logit scale. Exit 1 if any breaks.

    python verify/verify_patch3.py                              # all checks on a fresh ExpB1 model
    python verify/verify_patch3.py --inject-bug no_clamp        # SAP without the ceiling: exits 1
    python verify/verify_patch3.py --inject-bug temperature     # a fixed temperature sqrt(phy_dim): exits 1

The model is built by ``modeling.build_model`` from ``configs/Base-FewShot.yml`` (ResNet-12,
640-d, SAP defaults; no data, no weights). Checks, each printed with its measured value:

  1. ``sap.logit_scale_log`` exists and is a trainable ``nn.Parameter``;
  2. the initial scale is 25.00 (``exp(logit_scale_log)`` and the effective scale);
  3. the ceiling is 100.0;
  4. SAP has no ``temperature`` attribute;
  5. on a 5-way 1-shot episode (15 queries per class) of synthetic 640-d features (five class
     centres plus Gaussian noise, seed 0) the model's episode head gives a mean attention
     entropy clearly below log(5) = 1.609 (at most 90% of it) and a mean maximum attention
     clearly above 1/5 (at least 0.3); the forward returns the four stats;
  6. the attention equals an independent softmax(25 * cosine) of the same episode;
  7. with the log-scale set to log(200) the effective scale is exactly 100, the attention
     uses 100, ``logit_scale_clipped`` reports 1, and the clamp passes no gradient.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.config import load_config
from modeling import build_model
from modeling.layers.bounded_scale import BoundedScale
from verify.harness import Check, run_collected

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "Base-FewShot.yml"
EXPECTED_INIT = 25.0
EXPECTED_MAX = 100.0
N_WAY, K_SHOT, N_QUERY = 5, 1, 15
ENTROPY_FRACTION = 0.9  # "clearly below log(N)": at most this fraction of it
MAX_ATTN_FLOOR = 0.3  # "clearly above 1/N = 0.2"
NOISE = 2.0  # noise norm relative to the unit class centre
BUGS = ("no_clamp", "temperature", "init")


def build_default_model(config_file: str | Path = DEFAULT_CONFIG) -> nn.Module:
    """A freshly built ExpB1 model from the few-shot base config (random init)."""
    torch.manual_seed(0)
    return build_model(load_config(config_file))


def synthetic_episode(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(support (N*K, D), support_labels, query (N*Q, D), query_labels)``: unit class centres plus
    Gaussian noise of norm about ``NOISE`` (so a query's cosine to its own 1-shot prototype is about 0.2)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(N_WAY, dim, generator=g), dim=-1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(N_WAY).repeat_interleave(n)
        return centres[labels] + NOISE * torch.randn(len(labels), dim, generator=g) / math.sqrt(dim), labels

    support, s_lab = draw(K_SHOT)
    query, q_lab = draw(N_QUERY)
    return support, s_lab, query, q_lab


def reference_attention(feats: np.ndarray, anchors: np.ndarray, scale: float) -> np.ndarray:
    """Independent float64 softmax of ``scale * cos(feature, anchor)`` per row."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    z = scale * f @ a.T
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def run_checks(model: nn.Module) -> list[Check]:
    """Every invariant of SAP's bounded logit scale on ``model`` (an ExpB1 model with SAP); never raises on a
    broken invariant."""
    sap = getattr(model, "sap", None)
    if sap is None:
        return [Check("model has SAP", False, "model.sap is None (MODEL.SAP.ENABLED False?)")]
    model.eval()

    p = getattr(sap, "logit_scale_log", None)
    checks = [Check("logit_scale_log is a trainable nn.Parameter", isinstance(p, nn.Parameter) and p.requires_grad,
                    f"type {type(p).__name__}, requires_grad {getattr(p, 'requires_grad', None)}")]
    if not isinstance(p, torch.Tensor):
        return checks
    checks += _scale_checks(sap, p)

    support, s_lab, query, q_lab = synthetic_episode(sap.phy_dim)
    episode_checks, has_stats = _episode_checks(model, support, s_lab, query, q_lab)
    checks += episode_checks
    if not has_stats:
        return checks

    feats = torch.cat([support, query])
    with torch.no_grad():
        anchors = model.anchors(support, None)  # 1-shot: the prototypes are the support features
    checks.append(_reference_check(sap, feats, anchors))
    checks += _ceiling_checks(model, sap, p, feats, anchors)
    return checks


def _scale_checks(sap: nn.Module, p: torch.Tensor) -> list[Check]:
    """Checks 2-4: the initial scale, the ceiling, no ``temperature`` attribute."""
    init_raw = float(p.detach().exp())
    init_eff = float(sap.logit_scale.value()) if isinstance(getattr(sap, "logit_scale", None), BoundedScale) else math.nan
    ceiling = getattr(sap, "logit_scale_max", None)
    return [
        Check("initial scale = 25.00", abs(init_raw - EXPECTED_INIT) < 1e-4 and abs(init_eff - EXPECTED_INIT) < 1e-4,
              f"exp(logit_scale_log) = {init_raw:.4f}, effective = {init_eff:.4f}"),
        Check("ceiling = 100.0", ceiling == EXPECTED_MAX, f"logit_scale_max = {ceiling}"),
        Check("no temperature attribute", not hasattr(sap, "temperature"),
              f"hasattr(sap, 'temperature') = {hasattr(sap, 'temperature')}"),
    ]


def _episode_checks(model: nn.Module, support: torch.Tensor, s_lab: torch.Tensor, query: torch.Tensor,
                    q_lab: torch.Tensor) -> tuple[list[Check], bool]:
    """Check 5 on the synthetic 5-way episode through the episode head; the flag says whether the four SAP
    stats came back (the later checks need them)."""
    with torch.no_grad():
        logits, stats = model.episode_logits(support, s_lab, query, class_ids=None, n_way=N_WAY)
    missing = [k for k in ("attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped") if k not in stats]
    checks = [Check("forward returns the four SAP stats", not missing and logits.shape == (N_WAY * N_QUERY, N_WAY),
                    f"stats {sorted(stats)}, logits {tuple(logits.shape)}" + (f", missing {missing}" if missing else ""))]
    if missing:
        return checks, False
    ent, amax = float(stats["attn_entropy"]), float(stats["attn_max"])
    log_n = math.log(N_WAY)
    checks.append(Check(f"{N_WAY}-way attention entropy clearly below log({N_WAY}) = {log_n:.3f}",
                        ent <= ENTROPY_FRACTION * log_n, f"{ent:.3f} (<= {ENTROPY_FRACTION * log_n:.3f} required)"))
    checks.append(Check(f"{N_WAY}-way mean max attention clearly above 1/{N_WAY} = {1 / N_WAY:.3f}",
                        amax >= MAX_ATTN_FLOOR, f"{amax:.3f} (>= {MAX_ATTN_FLOOR} required)"))
    acc = float((logits.argmax(-1) == q_lab).float().mean())
    checks.append(Check("episode head classifies the synthetic episode", acc > 1 / N_WAY, f"query accuracy {acc:.3f}"))
    return checks, True


def _reference_check(sap: nn.Module, feats: torch.Tensor, anchors: torch.Tensor) -> Check:
    """Check 6: the attention against an independent float64 formula at the initial scale."""
    with torch.no_grad():
        attn, _, _ = sap.compute_cross_attention(feats, anchors)
    ref = reference_attention(sap.q_proj(feats).detach().double().numpy(), sap.k_proj(anchors).detach().double().numpy(),
                              EXPECTED_INIT)
    err = float(np.abs(attn.double().numpy() - ref).max())
    return Check("attention = softmax(25 * cosine) (independent float64)", err < 1e-4, f"max abs error {err:.2e}")


def _ceiling_checks(model: nn.Module, sap: nn.Module, p: torch.Tensor, feats: torch.Tensor,
                    anchors: torch.Tensor) -> list[Check]:
    """Check 7: log(200) gives exactly 100, the attention uses 100, clipped is reported, the clamp passes no
    gradient. The log-scale is restored and the gradients cleared afterwards."""
    checks: list[Check] = []
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.copy_(torch.log(torch.tensor(200.0)))
        eff = float(sap.logit_scale().detach())
        checks.append(Check("log-scale = log(200) gives effective scale exactly 100", eff == EXPECTED_MAX,
                            f"effective scale {eff!r}"))
        with torch.no_grad():
            attn, _, _ = sap.compute_cross_attention(feats, anchors)
            _, stats = sap(feats, anchors)
        ref = reference_attention(sap.q_proj(feats).detach().double().numpy(),
                                  sap.k_proj(anchors).detach().double().numpy(), EXPECTED_MAX)
        err = float(np.abs(attn.double().numpy() - ref).max())
        clipped = float(stats["logit_scale_clipped"])
        checks.append(Check("at the ceiling the attention uses 100 and logit_scale_clipped = 1",
                            err < 1e-4 and clipped == 1.0, f"max abs error {err:.2e}, clipped {clipped}"))
        if p.grad is not None:
            p.grad = None
        with torch.enable_grad():
            attn, _, _ = sap.compute_cross_attention(feats, anchors)
            (attn * torch.randn_like(attn)).sum().backward()
        grad = 0.0 if p.grad is None else float(p.grad)
        checks.append(Check("no gradient to logit_scale_log at the ceiling", grad == 0.0, f"grad {grad!r}"))
    finally:
        with torch.no_grad():
            p.copy_(saved)
        model.zero_grad(set_to_none=True)
    return checks


def inject_bug(model: nn.Module, bug: str) -> None:
    """Break ``model`` in the way ``bug`` names (to show the checks catch it)."""
    sap = model.sap
    if bug == "no_clamp":  # a log-scale with no ceiling
        sap.logit_scale = BoundedScale(EXPECTED_INIT, max_value=None, parameterization="log", constraint="none")
    elif bug == "temperature":  # cosine / sqrt(phy_dim) with a fixed ``temperature`` attribute
        sap.logit_scale = BoundedScale(1 / math.sqrt(sap.phy_dim), max_value=EXPECTED_MAX, learnable=False)
        sap.temperature = math.sqrt(sap.phy_dim)
    elif bug == "init":
        sap.logit_scale.set_value(1.0)
    else:
        raise ValueError(f"unknown bug '{bug}'")


def _checks_of(config_file: str, bug: str | None) -> list[Check]:
    model = build_default_model(config_file)
    if bug:
        inject_bug(model, bug)
    return run_checks(model)


def main(argv: list[str] | None = None) -> int:
    return run_collected("verify_patch3", _checks_of, argv, doc=__doc__, bugs=BUGS, config_file=DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
