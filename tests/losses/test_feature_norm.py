"""Feature-norm band loss: a hand-computed case and its gradient, the free band, the weight, the mask."""

from __future__ import annotations

import pytest
import torch

from losses import feature_norm_loss


def test_feature_norm_hand_computed_case() -> None:
    # Norms 3, 7, 11, 14; band [6, 10]: outside by 3, 0, 1, 4 -> squares 9, 0, 1, 16 -> mean 6.5.
    x = torch.tensor([[3.0, 0.0], [0.0, 7.0], [11.0, 0.0], [0.0, 14.0]], requires_grad=True)
    w = 5e-3
    loss, stats = feature_norm_loss(x, target=8.0, band=2.0, weight=w)
    assert loss.item() == pytest.approx(w * 6.5, rel=1e-6)
    assert stats["feat_norm_penalty"] == pytest.approx(6.5, rel=1e-6)
    assert stats["feat_norm_outside"] == pytest.approx(0.75)
    assert stats["feat_norm_mean"] == pytest.approx(35 / 4)
    loss.backward()
    # d/dx of w/4 * (|norm - 8| - 2)^2 along x/|x|: 2 * excess * sign(norm - 8) * w / 4.
    expected = torch.tensor([[-1.5 * w, 0.0], [0.0, 0.0], [0.5 * w, 0.0], [0.0, 2.0 * w]])
    torch.testing.assert_close(x.grad, expected)


def test_feature_norm_inside_band_is_free_and_weight_is_a_parameter() -> None:
    x = torch.randn(5, 16)
    x = 7.0 * x / x.norm(dim=1, keepdim=True)
    assert feature_norm_loss(x)[0].item() == 0.0
    y = 20.0 * x / 7.0
    l5 = feature_norm_loss(y, weight=5e-3)[0].item()
    l10 = feature_norm_loss(y, weight=1e-2)[0].item()
    assert l5 == pytest.approx(5e-3 * 100.0, rel=1e-5)  # 20 is 10 past the upper edge
    assert l10 == pytest.approx(2 * l5, rel=1e-6)


def test_feature_norm_mask() -> None:
    x = torch.tensor([[14.0, 0.0], [8.0, 0.0]])
    loss, _ = feature_norm_loss(x, mask=torch.tensor([False, True]))
    assert loss.item() == 0.0
