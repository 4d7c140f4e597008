"""HDM (modeling/module/hdm.py): null features, masked keys, the batched queries against seven QueryAttention
calls in float64, attention dropout as SDPA applies it, no repeated index in backward, QueryAttention against
nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling.module.hdm import HDM_SUBSETS, HierarchicalDecoupling, QueryAttention
from tests.helpers.repeated_index import RepeatedIndexWatch

MASK = torch.tensor([[True, True, True], [True, False, True], [True, True, False], [False, False, True]])


def test_hdm_null_features_and_masked_keys() -> None:
    torch.manual_seed(1)
    hdm = HierarchicalDecoupling(32, dropout=0.0).eval()
    tokens = torch.randn(3, 2, 5, 32)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    out = hdm(tokens, mask)  # (2, 7, 32)
    for s, subset in enumerate(HDM_SUBSETS):
        if not any(mask[0, i] for i in subset):  # N, T, NT lost everything for sample 0
            assert torch.equal(out[0, s], hdm.null_features[s])
    # RN for sample 0 attends over the RGB tokens only
    rn = HDM_SUBSETS.index((0, 1))
    assert torch.allclose(out[0, rn], hdm.queries[rn](tokens[0, :1])[0], atol=1e-6)
    # sample 1 is complete: same as no mask
    assert torch.allclose(out[1], hdm(tokens, None)[1], atol=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_batched_hdm_equals_seven_query_attentions_in_float64(masked: bool) -> None:
    """Outputs and every gradient of the batched HDM equal seven QueryAttention calls on each subset's
    concatenated, masked keys (the per-subset definition), null features where a subset lost everything."""
    torch.manual_seed(4)
    hdm = HierarchicalDecoupling(32, dropout=0.0).double()
    with torch.no_grad():
        for param in hdm.parameters():
            param.add_(0.1 * torch.randn_like(param))  # non-zero biases, every subset different
    tokens = torch.randn(3, 4, 5, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, True], [False, True, True], [False, False, True]])
    mask = mask if masked else None
    probe = torch.randn(4, 7, 32, dtype=torch.float64)

    def reference() -> torch.Tensor:
        outs = []
        for s, subset in enumerate(HDM_SUBSETS):
            keys = torch.cat([tokens[i] for i in subset], dim=1)
            if mask is None:
                outs.append(hdm.queries[s](keys))
                continue
            present = mask[:, list(subset)]
            none_left = ~present.any(dim=1, keepdim=True)
            out = hdm.queries[s](keys, present.repeat_interleave(5, dim=1) | none_left)
            outs.append(torch.where(none_left, hdm.null_features[s], out))
        return torch.stack(outs, dim=1)

    results = []
    for forward in (lambda: hdm(tokens, mask), reference):
        hdm.zero_grad()
        tokens.grad = None
        out = forward()
        (out * probe).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in hdm.parameters()]
        results.append([out.detach(), tokens.grad.clone(), *grads])  # null features unused without a mask
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_hdm_attention_dropout_drops_weights_as_sdpa_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """In training, dropout acts on the attention weights before they average the values (SDPA's, DeMo's):
    out = out_proj(sum_t drop(p)_t (W_v x_t + b_v)), checked in float64 against that formula, keys and values
    projected per subset, with the same dropped weights."""
    torch.manual_seed(7)
    hdm = HierarchicalDecoupling(32, dropout=0.5).double().train()
    with torch.no_grad():
        for param in hdm.parameters():
            param.add_(0.1 * torch.randn_like(param))
    b, length, heads, hd = 4, 5, hdm.queries[0].num_heads, 32 // hdm.queries[0].num_heads
    tokens = torch.randn(3, b, length, 32, dtype=torch.float64)
    kept = torch.rand(b, 7 * heads, 3 * length, generator=torch.Generator().manual_seed(0)) > 0.5

    def fixed_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        assert training and p == 0.5 and x.shape == kept.shape
        return x * kept / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", fixed_dropout)
    out = hdm(tokens, MASK)
    for s, subset in enumerate(HDM_SUBSETS):
        qa = hdm.queries[s]
        w_q, w_k, w_v = qa.in_proj_weight.split(32)
        b_q, b_k, b_v = qa.in_proj_bias.split(32)
        keys = torch.cat([tokens[m] for m in subset], dim=1)  # (B, L_s, D)
        present = MASK[:, list(subset)].repeat_interleave(length, dim=1)
        q = (w_q @ qa.query + b_q).view(heads, hd)
        k, v = (keys @ w_k.T + b_k).view(b, -1, heads, hd), (keys @ w_v.T + b_v).view(b, -1, heads, hd)
        logits = torch.einsum("hj,bthj->bht", q, k) / hd**0.5
        probs = torch.softmax(logits.masked_fill(~present[:, None], -torch.inf), dim=-1)
        cols = torch.cat([torch.arange(m * length, (m + 1) * length) for m in subset])
        drop = kept[:, s * heads:(s + 1) * heads][:, :, cols] / 0.5
        want = qa.out_proj(torch.einsum("bht,bthj->bhj", probs * drop, v).reshape(b, 32))
        lost = ~MASK[:, list(subset)].any(dim=1)
        assert torch.allclose(out[~lost, s], want[~lost], rtol=1e-10, atol=1e-12)
        assert torch.equal(out[lost, s], hdm.null_features[s].expand(int(lost.sum()), -1))


def test_hdm_backward_adds_no_index_twice() -> None:
    torch.manual_seed(6)
    hdm = HierarchicalDecoupling(32, dropout=0.0)
    tokens = torch.randn(3, 4, 5, 32, requires_grad=True)
    watch = RepeatedIndexWatch()
    with watch.mode:
        hdm(tokens, MASK).sum().backward()
    assert not watch.repeated, watch.repeated
    assert tokens.grad is not None and all(p.grad is not None for p in hdm.parameters())


def test_query_attention_equals_multihead_attention() -> None:
    torch.manual_seed(2)
    qa = QueryAttention(32, 4).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(qa.in_proj_weight)
        mha.in_proj_bias.copy_(torch.randn(96))
        qa.in_proj_bias.copy_(mha.in_proj_bias)
        mha.out_proj.weight.copy_(qa.out_proj.weight)
        mha.out_proj.bias.copy_(torch.randn(32))
        qa.out_proj.bias.copy_(mha.out_proj.bias)
        keys = torch.randn(3, 7, 32)
        key_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 2 + [True] * 5])
        ref, _ = mha(qa.query.view(1, 1, 32).expand(3, 1, 32), keys, keys, key_padding_mask=~key_mask)
        got = qa(keys, key_mask)
    assert torch.allclose(got, ref[:, 0], atol=1e-5)
