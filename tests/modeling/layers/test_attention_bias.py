"""AttentionBiasGenerator: the bounded bias scale by hand, the output clip, gradients, the frozen variant."""

from __future__ import annotations

import pytest
import torch

from modeling.layers import AttentionBiasGenerator


def test_attention_bias_generator_formula_and_bounds() -> None:
    gen = AttentionBiasGenerator()
    w = torch.tensor([0.0, 0.8, -0.6, 0.3, 1.0, -1.0])
    torch.testing.assert_close(gen(w), w * 2.5)
    gen.scale.set_value(50.0)
    torch.testing.assert_close(gen(w), (w * 5.0).clamp(-5, 5))
    wide = AttentionBiasGenerator(bias_scale=2.5, max_scale=20.0, warn_threshold=None)
    wide.scale.set_value(9.0)
    out = wide(w)
    assert out.abs().max().item() == 5.0  # output clip at +-5 even if the scale allows more
    assert out[1].item() == 5.0 and out[3].item() == pytest.approx(2.7, rel=1e-5)
    stats = gen.stats()
    assert stats["bias_scale"] == pytest.approx(5.0) and stats["bias_scale_at_bound"] == pytest.approx(0.5)


def test_attention_bias_generator_gradient_and_frozen_variant() -> None:
    gen = AttentionBiasGenerator()
    w = torch.tensor([0.2, -0.4])
    gen(w).sum().backward()
    # d/dp sum(w * exp(p)) = sum(w) * scale
    assert gen.scale.raw.grad.item() == pytest.approx(-0.2 * 2.5, rel=1e-5)
    frozen = AttentionBiasGenerator(learnable_scale=False)
    assert list(frozen.parameters()) == []
