"""finish_stats (losses/common.py) through every loss: host_stats=False gives the float stats as device tensors."""

from __future__ import annotations

import pytest
import torch


def test_host_stats_false_returns_the_same_values_as_device_tensors() -> None:
    """Training loops ask for device tensors (no host sync); the values must equal the float stats."""
    from losses import feature_norm_loss, id_loss, sdm_loss, triplet_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits = torch.randn(8, 4, generator=g)
    for fn, args in ((sdm_loss, (a, b, pids)), (triplet_loss, (a, pids)), (id_loss, (logits, pids % 4)),
                     (feature_norm_loss, (a * 3,))):
        loss_f, floats = fn(*args)
        loss_t, tensors = fn(*args, host_stats=False)
        assert torch.equal(loss_f, loss_t) and floats.keys() == tensors.keys()
        for key, value in tensors.items():
            assert not isinstance(value, torch.Tensor) or not value.requires_grad  # numbers pass through
            assert float(value) == pytest.approx(floats[key], rel=1e-6, abs=1e-9)
