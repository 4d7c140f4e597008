"""SAP with its learnable, bounded logit scale: numbers by hand, clamp, gradients, stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from modeling.module.semantic_anchor_purification import SemanticAnchorPurification


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum(-1).mean())


def test_two_anchor_case_by_hand() -> None:
    """f = (3, 4), anchors e1, e2: cosines 0.6 / 0.8, scale 25 -> logits 15 / 20 -> minus max -5 / 0."""
    sap = SemanticAnchorPurification(2)  # projections start as the identity, purify weight 0.5
    f = torch.tensor([[3.0, 4.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    attn, log_attn, scale = sap.compute_cross_attention(f, anchors)
    p1 = math.exp(-5) / (1 + math.exp(-5))  # 0.0066928509...
    assert float(scale.detach()) == pytest.approx(25.0, rel=1e-6)
    assert attn.tolist()[0] == pytest.approx([p1, 1 - p1], rel=1e-5)
    assert log_attn.tolist()[0] == pytest.approx([-5 - math.log1p(math.exp(-5)), -math.log1p(math.exp(-5))], rel=1e-5)
    out, stats = sap(f, anchors)
    # purified = f / |f| + 0.5 * (attn @ anchors)
    assert out.tolist()[0] == pytest.approx([0.6 + 0.5 * p1, 0.8 + 0.5 * (1 - p1)], rel=1e-5)
    assert float(stats["attn_entropy"]) == pytest.approx(-(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), rel=1e-4)
    assert float(stats["attn_max"]) == pytest.approx(1 - p1, rel=1e-6)
    assert float(stats["logit_scale"]) == pytest.approx(25.0, rel=1e-6)
    assert float(stats["logit_scale_clipped"]) == 0.0


def test_parameter_and_no_temperature() -> None:
    sap = SemanticAnchorPurification(640)
    assert isinstance(sap.logit_scale_log, nn.Parameter)
    assert sap.logit_scale_log is sap.logit_scale.raw  # one tensor, two names
    assert float(sap.logit_scale_log.detach().exp()) == pytest.approx(25.0, rel=1e-6)
    assert sap.logit_scale_max == 100.0
    assert not hasattr(sap, "temperature")
    names = [n for n, _ in sap.named_parameters()]
    assert names.count("logit_scale.raw") == 1


def test_clamp_at_100_and_its_gradient() -> None:
    torch.manual_seed(0)
    sap = SemanticAnchorPurification(8, projections=False)
    f, a = torch.randn(6, 8), torch.randn(3, 8)
    w = torch.randn(6, 3)

    def objective(scale: float) -> float:  # independent float64: sum(w * softmax(scale * cos))
        fn = f.double().numpy() / np.linalg.norm(f.double().numpy(), axis=1, keepdims=True)
        an = a.double().numpy() / np.linalg.norm(a.double().numpy(), axis=1, keepdims=True)
        z = scale * fn @ an.T
        p = np.exp(z - z.max(1, keepdims=True))
        return float((w.double().numpy() * p / p.sum(1, keepdims=True)).sum())

    # below the ceiling: d/d(log s) = s * d/ds, checked by a central difference
    sap.logit_scale.set_value(50.0)
    attn, _, _ = sap.compute_cross_attention(f, a)
    (attn * w).sum().backward()
    h = 1e-4
    expected = 50.0 * (objective(50.0 + h) - objective(50.0 - h)) / (2 * h)
    assert float(sap.logit_scale_log.grad) == pytest.approx(expected, rel=1e-3)
    # at and beyond the ceiling: exactly 100, and the clamp passes no gradient
    sap.zero_grad()
    sap.logit_scale.set_value(200.0)
    assert float(sap.logit_scale_log.detach()) == pytest.approx(math.log(200.0))
    attn, _, scale = sap.compute_cross_attention(f, a)
    assert float(scale.detach()) == 100.0
    (attn * w).sum().backward()
    assert float(sap.logit_scale_log.grad) == 0.0
    assert float((attn * w).sum().detach()) == pytest.approx(objective(100.0), rel=1e-5)
    _, stats = sap(f, a)
    assert float(stats["logit_scale_clipped"]) == 1.0 and float(stats["logit_scale"]) == 100.0


def test_row_max_subtraction_keeps_saturated_rows_finite() -> None:
    sap = SemanticAnchorPurification(4, projections=False)
    sap.logit_scale.set_value(100.0)
    f = torch.eye(4) * 1e3
    attn, log_attn, _ = sap.compute_cross_attention(f, torch.eye(4))
    assert torch.isfinite(attn).all() and torch.isfinite(log_attn).all()
    ref = np.exp(100 * np.eye(4) - 100)
    assert attn.detach().double().numpy() == pytest.approx(ref / ref.sum(1, keepdims=True), abs=1e-7)


def test_entropy_and_max_stats_against_numpy() -> None:
    torch.manual_seed(1)
    sap = SemanticAnchorPurification(16, projections=False)
    f, a = torch.randn(40, 16), torch.randn(5, 16)
    _, stats = sap(f, a)
    fn = f.double().numpy() / np.linalg.norm(f.double().numpy(), axis=1, keepdims=True)
    an = a.double().numpy() / np.linalg.norm(a.double().numpy(), axis=1, keepdims=True)
    z = 25 * fn @ an.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert float(stats["attn_entropy"]) == pytest.approx(entropy(p), rel=1e-4)
    assert float(stats["attn_max"]) == pytest.approx(float(p.max(1).mean()), rel=1e-5)
    # identical anchors: uniform attention, entropy log N and max 1/N
    _, stats = sap(f, a[:1].repeat(5, 1))
    assert float(stats["attn_entropy"]) == pytest.approx(math.log(5), rel=1e-5)
    assert float(stats["attn_max"]) == pytest.approx(0.2, rel=1e-5)
    assert all(not v.requires_grad for v in stats.values())


def test_scale_modes_for_the_ablation() -> None:
    fixed = SemanticAnchorPurification(640, scale_mode="fixed")
    assert not isinstance(fixed.logit_scale_log, nn.Parameter)
    assert float(fixed.logit_scale()) == pytest.approx(1 / math.sqrt(640), rel=1e-6)  # cosine / 25.3 (SCALE_MODE fixed)
    assert not hasattr(fixed, "temperature")
    const = SemanticAnchorPurification(640, scale_mode="constant")
    assert not isinstance(const.logit_scale_log, nn.Parameter) and float(const.logit_scale()) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="SCALE_MODE"):
        SemanticAnchorPurification(8, scale_mode="wild")
    # on a clear 5-way case the fixed temperature leaves the attention nearly uniform, the learnable scale not
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 640, generator=g)
    f = a.repeat_interleave(4, 0) + 0.5 * torch.randn(20, 640, generator=g)
    _, s_fixed = fixed(f, a)
    _, s_learn = SemanticAnchorPurification(640)(f, a)
    assert float(s_fixed["attn_entropy"]) > 0.99 * math.log(5)
    assert float(s_learn["attn_entropy"]) < 0.5 * math.log(5)


def test_batched_episodes_and_gradient_reaches_scale_and_features() -> None:
    sap = SemanticAnchorPurification(8)
    f = torch.randn(3, 10, 8, requires_grad=True)
    a = torch.randn(3, 4, 8)
    out, stats = sap(f, a)
    assert out.shape == (3, 10, 8)
    out.square().sum().backward()
    assert f.grad is not None and sap.logit_scale_log.grad is not None and float(sap.logit_scale_log.grad) != 0.0
    with pytest.raises(ValueError, match="feature dim"):
        sap(torch.randn(2, 7), torch.randn(3, 7))


