"""DGAF (modeling/module/dgaf.py): gates and the initial fusion by hand, masked modalities, its stats."""

from __future__ import annotations

import pytest
import torch

from modeling.module.dgaf import DualGatedFusion

MASK = torch.tensor([[True, True, True], [True, False, True], [True, True, False], [False, False, True]])


def test_dgaf_gates_and_initial_fusion() -> None:
    torch.manual_seed(4)
    dgaf = DualGatedFusion(16, 3)
    feats = torch.randn(4, 3, 16)
    res = dgaf(feats, MASK)
    fused, w, c = res.fused, res.weights, res.channel_gates
    present = MASK.float()
    assert list(res.stats) == ["dgaf/weight_RGB", "dgaf/weight_NI", "dgaf/weight_TI", "dgaf/channel_gate_mean"]
    assert float(res.stats["dgaf/weight_NI"]) == pytest.approx(float(w[:, 1].detach().mean()))
    assert float(res.stats["dgaf/channel_gate_mean"]) == pytest.approx(0.5)
    assert torch.allclose(w, present / present.sum(1, keepdim=True))  # uniform over present at init
    assert torch.allclose(c, torch.full_like(c, 0.5))
    ref = (feats * present[..., None]).sum(1) / present.sum(1, keepdim=True)  # masked mean
    assert torch.allclose(fused, ref, atol=1e-6)
    # once trained: weights still sum to 1 over present modalities and 0 on missing ones
    with torch.no_grad():
        for p in dgaf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    res = dgaf(feats, MASK)
    fused, w = res.fused, res.weights
    assert torch.allclose(w.sum(1), torch.ones(4)) and bool((w[~MASK] == 0).all())
    alt = feats.clone()
    alt[~MASK] = 100.0
    assert torch.allclose(dgaf(alt, MASK).fused, fused, atol=1e-5)
    assert torch.isfinite(dgaf(feats, torch.zeros(4, 3, dtype=torch.bool)).fused).all()
