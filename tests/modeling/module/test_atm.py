"""ATM (modeling/module/atm.py): the batched experts against DeMo's per-chunk, per-expert loops, and its stats."""

from __future__ import annotations

import math

import pytest
import torch

from modeling.module.atm import AttentionTriggeredMoE, quick_gelu


def test_atm_matches_per_expert_loop() -> None:
    """The batched experts give DeMo's MoM (loop over chunks and experts, same weights, same layout)."""
    torch.manual_seed(3)
    atm = AttentionTriggeredMoE(32, num_experts=7, num_heads=4).train()
    feats = torch.randn(5, 7, 32)
    res = atm(feats)
    out, gates = res.feat, res.gates
    c = 8
    # reference: DeMo's loops; BatchNorm in training mode (batch statistics), per expert chunk
    y = torch.empty(5, 7, 4, c)
    for h in range(4):
        for e in range(7):
            lin = quick_gelu(feats[:, e, h * c:(h + 1) * c] @ atm.expert_weight[e, h].t() + atm.expert_bias[e, h])
            mean, var = lin.mean(0), lin.var(0, unbiased=False)
            sl = slice((e * 4 + h) * c, (e * 4 + h + 1) * c)
            y[:, e, h] = (lin - mean) / torch.sqrt(var + 1e-5) * atm.expert_bn.weight[sl] + atm.expert_bn.bias[sl]
    query = atm.gate_q(atm.gate_reduce(feats.reshape(5, -1)))
    key = atm.gate_k(feats)
    ref_gates = torch.stack([torch.softmax(key[:, :, h * c:(h + 1) * c] @ query[:, h * c:(h + 1) * c, None]
                                           / math.sqrt(c), dim=1)[..., 0] for h in range(4)], dim=1)  # (5, 4, 7)
    ref = torch.cat([y[:, :, h] * ref_gates[:, h, :, None] for h in range(4)], dim=-1).flatten(1)
    assert torch.allclose(gates, ref_gates, atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-4)
    assert out.shape == (5, 7 * 32) and torch.allclose(gates.sum(-1), torch.ones(5, 4))
    # its own statistics, named by expert index by default
    assert list(res.stats) == [f"atm/gate_{e}" for e in range(7)] + ["atm/gate_entropy", "atm/gate_max"]
    assert all(v.dim() == 0 and not v.requires_grad for v in res.stats.values())
    assert float(res.stats["atm/gate_3"]) == pytest.approx(float(ref_gates[:, :, 3].detach().mean()), rel=1e-5)
    assert float(res.stats["atm/gate_max"]) == pytest.approx(float(ref_gates.detach().amax(-1).mean()), rel=1e-5)
