"""ID loss (cross-entropy with label smoothing) against F.cross_entropy and a float64 hand formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses import id_loss


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_id_loss_matches_cross_entropy_with_label_smoothing(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g) * 3
    targets = torch.randint(0, 7, (12,), generator=g)
    loss, stats = id_loss(logits, targets, label_smoothing=eps)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=eps).item(), rel=1e-6)
    # Hand formula in float64: target distribution (1 - eps) * onehot + eps / C.
    lp = torch.log_softmax(logits.double(), dim=1)
    target = torch.full((12, 7), eps / 7, dtype=torch.float64)
    target[torch.arange(12), targets] += 1 - eps
    assert loss.item() == pytest.approx(-(target * lp).sum(1).mean().item(), rel=1e-6)
    assert stats["id_acc"] == pytest.approx((logits.argmax(1) == targets).double().mean().item())


def test_id_loss_half_logits_computed_in_float32() -> None:
    logits = torch.randn(6, 5).half()
    targets = torch.arange(6) % 5
    loss, _ = id_loss(logits, targets, 0.1)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.double(), targets, label_smoothing=0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_id_loss_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        id_loss(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=1.0)
