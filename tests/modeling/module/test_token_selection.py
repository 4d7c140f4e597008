"""CrossModalAttention, TokenSparse and SDTPS (modeling/module/token_selection.py) against independent float64 /
hand formulas, and the public import path modeling.sdtps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling.module.token_selection import SDTPS, CrossModalAttention, TokenSparse, num_keep_tokens


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _reference_cross_attention(m: CrossModalAttention, g: torch.Tensor, p: torch.Tensor) -> np.ndarray:
    """numpy float64: softmax(QK^T/sqrt(d)) * sigmoid(scale * cos_h + bias), per head."""
    h, d = m.num_heads, m.head_dim
    g64, p64 = g.double().numpy(), p.double().numpy()
    wq, bq = m.q_proj.weight.detach().double().numpy(), m.q_proj.bias.detach().double().numpy()
    wk, bk = m.k_proj.weight.detach().double().numpy(), m.k_proj.bias.detach().double().numpy()
    scale, bias = m.gate_scale.detach().double().numpy(), m.gate_bias.detach().double().numpy()
    b, n, _ = p64.shape
    out = np.zeros((b, h, n))
    for i in range(b):
        q = g64[i] @ wq.T + bq
        k = p64[i] @ wk.T + bk
        for hh in range(h):
            sl = slice(hh * d, (hh + 1) * d)
            logits = k[:, sl] @ q[sl] / math.sqrt(d)
            attn = np.exp(logits - logits.max())
            attn /= attn.sum()
            gc, pc = g64[i, sl], p64[i, :, sl]
            cos = pc @ gc / (np.linalg.norm(pc, axis=1) * np.linalg.norm(gc))
            gate = 1 / (1 + np.exp(-(scale[hh] * cos + bias[hh])))
            out[i, hh] = attn * gate
    return out


def test_gate_matches_hand_values() -> None:
    m = CrossModalAttention(8, 2, init_scale=0.5, init_bias=0.5)
    with torch.no_grad():
        m.gate_scale.copy_(torch.tensor([0.5, 2.0]))
        m.gate_bias.copy_(torch.tensor([0.5, -1.0]))
    cos = torch.tensor([[-1.0, 0.0, 0.3, 1.0]]).expand(2, 4).unsqueeze(0)  # (1, 2, 4)
    gate = m.gate_from_cosine(cos)[0]
    want = [[_sigmoid(0.5 * c + 0.5) for c in (-1.0, 0.0, 0.3, 1.0)], [_sigmoid(2.0 * c - 1.0) for c in (-1.0, 0.0, 0.3, 1.0)]]
    assert np.allclose(gate.detach().numpy(), want, atol=1e-6)
    # the gate's range at the default init 0.5/0.5: sigmoid(0) at cosine -1, sigmoid(1) at +1
    # (init 1.0/0.0 would start at sigmoid(-1) = 0.27)
    default = CrossModalAttention(8, 2)
    ends = default.gate_from_cosine(torch.tensor([-1.0, 1.0]).view(1, 1, 2).expand(1, 2, 2))
    assert ends[0, 0].tolist() == pytest.approx([0.5, _sigmoid(1.0)], abs=1e-7)


def test_gate_parameters_are_clamped_to_the_bound() -> None:
    m = CrossModalAttention(8, 2, param_bound=5.0)
    with torch.no_grad():
        m.gate_scale.fill_(12.0)
        m.gate_bias.fill_(-9.0)
    scale, bias = m.scale_and_bias()
    assert scale.tolist() == [5.0, 5.0] and bias.tolist() == [-5.0, -5.0]
    with pytest.raises(ValueError, match="outside"):
        CrossModalAttention(8, 2, init_scale=6.0, param_bound=5.0)


@pytest.mark.parametrize("renorm", [False, True])
def test_forward_matches_independent_formula(renorm: bool) -> None:
    torch.manual_seed(0)
    m = CrossModalAttention(16, 4, renormalize_attn=renorm)
    with torch.no_grad():
        m.gate_scale.copy_(torch.tensor([0.5, 1.0, -0.7, 2.0]))
        m.gate_bias.copy_(torch.tensor([0.5, 0.0, 0.2, -0.3]))
        m.q_proj.bias.normal_()
        m.k_proj.bias.normal_()
    g, p = torch.randn(3, 16), torch.randn(3, 11, 16)
    attn_gated, gate = m(g, p)
    ref = _reference_cross_attention(m, g, p)
    if renorm:
        ref = ref / (ref.sum(-1, keepdims=True) + 1e-8)
        assert attn_gated.sum(-1).detach().numpy() == pytest.approx(np.ones((3, 4)), abs=1e-5)
    assert attn_gated.detach().double().numpy() == pytest.approx(ref, abs=1e-6)
    assert gate.shape == (3, 4, 11)


def test_gate_norm_normalises_over_heads_for_any_n() -> None:
    m = CrossModalAttention(16, 4, use_gate_norm=True)
    for n in (1, 5, 130):
        attn_gated, gate = m(torch.randn(2, 16), torch.randn(2, n, 16))
        assert attn_gated.shape == (2, 4, n)
        logits = torch.logit(gate.double())
        assert logits.mean(dim=1).abs().max() < 1e-4  # LayerNorm over the heads, affine at init


def test_gradients_reach_scale_bias_projections_and_tokens() -> None:
    m = CrossModalAttention(16, 4)
    g = torch.randn(2, 16, requires_grad=True)
    p = torch.randn(2, 9, 16, requires_grad=True)
    attn_gated, _ = m(g, p)
    (attn_gated * torch.randn_like(attn_gated)).sum().backward()
    for t in (m.gate_scale, m.gate_bias, m.q_proj.weight, m.k_proj.weight, g, p):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize(("n", "ratio", "k"), [(128, 0.5, 64), (10, 0.3, 3), (10, 0.01, 1), (7, 1.0, 7), (33, 0.7, 24)])
def test_num_keep(n: int, ratio: float, k: int) -> None:
    assert num_keep_tokens(n, ratio) == k
    assert TokenSparse(ratio).num_output_tokens(n) == (k if k == n else k + 1)


def test_token_sparse_topk_and_weighted_merge() -> None:
    torch.manual_seed(1)
    ts = TokenSparse(0.25)
    x, s = torch.randn(4, 20, 6), torch.rand(4, 20)
    tokens, keep = ts(x, s)
    assert tokens.shape == (4, 6, 6) and keep.shape == (4, 5)
    x64, s64 = x.double().numpy(), s.double().numpy()
    for b in range(4):
        order = sorted(range(20), key=lambda j: -s64[b, j])
        assert keep[b].tolist() == order[:5]  # best first
        assert torch.equal(tokens[b, :5], x[b, order[:5]])
        rest = order[5:]
        w = s64[b, rest]
        ref = (w[:, None] * x64[b, rest]).sum(0) / w.sum()
        assert tokens[b, 5].double().numpy() == pytest.approx(ref, abs=1e-6)


def test_token_sparse_keep_all_has_no_extra_token_and_merge_carries_gradient() -> None:
    x, s = torch.randn(2, 5, 3), torch.rand(2, 5)
    tokens, keep = TokenSparse(1.0)(x, s)
    assert tokens.shape == (2, 5, 3) and keep.shape == (2, 5)
    s = torch.rand(2, 8, requires_grad=True)
    tokens, _ = TokenSparse(0.5)(torch.randn(2, 8, 3), s)
    tokens[:, -1].sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _sdtps_inputs(b: int = 3, n: int = 12, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3, b, d), torch.randn(3, b, n, d)


def test_sdtps_scores_are_the_mean_of_self_and_cross_terms() -> None:
    torch.manual_seed(2)
    model = SDTPS(16, num_heads=4, keep_ratio=0.5)
    cls, patches = _sdtps_inputs()
    out = model(cls, patches)
    names = ("RGB", "NI", "TI")
    for ip, p in enumerate(names):
        terms = [model.attn[f"{q}_to_{p}"](cls[iq], patches[ip])[0].mean(1) for iq, q in enumerate(names)]
        assert torch.allclose(out.scores[ip], sum(terms) / 3, atol=1e-6)
    assert out.tokens.shape == (3, 3, 7, 16) and out.keep_indices.shape == (3, 3, 6)
    assert int(out.keep_indices.min()) >= 0 and int(out.keep_indices.max()) < 12


def test_sdtps_excludes_missing_modalities_from_cross_scores() -> None:
    torch.manual_seed(3)
    model = SDTPS(16, num_heads=4, keep_ratio=0.5)
    cls, patches = _sdtps_inputs()
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    out = model(cls, patches, mask)
    s = {(q, p): model.attn[f"{q}_to_{p}"](cls[iq], patches[ip])[0].mean(1)
         for iq, q in enumerate(("RGB", "NI", "TI")) for ip, p in enumerate(("RGB", "NI", "TI"))}
    # sample 1 misses NI: RGB's score averages its self term and TI's cross term only
    assert torch.allclose(out.scores[0, 1], (s["RGB", "RGB"][1] + s["TI", "RGB"][1]) / 2, atol=1e-6)
    # sample 2 misses RGB: TI's score = (self + NI) / 2
    assert torch.allclose(out.scores[2, 2], (s["TI", "TI"][2] + s["NI", "TI"][2]) / 2, atol=1e-6)
    # sample 0 has everything
    assert torch.allclose(out.scores[1, 0], (s["NI", "NI"][0] + s["RGB", "NI"][0] + s["TI", "NI"][0]) / 3, atol=1e-6)
    # what a missing modality holds cannot change the others' selection
    cls2, patches2 = cls.clone(), patches.clone()
    cls2[1, 1] += 10 * torch.randn(16)
    out2 = model(cls2, patches2, mask)
    assert torch.equal(out2.keep_indices[0, 1], out.keep_indices[0, 1])
    assert torch.allclose(out2.tokens[2, 1], out.tokens[2, 1])


def test_sdtps_stats_are_detached_scalars() -> None:
    model = SDTPS(16, num_heads=4, keep_ratio=0.5, init_scale=0.3, init_bias=0.7)
    cls, patches = _sdtps_inputs()
    cls.requires_grad_()
    out = model(cls, patches, torch.tensor([[True, True, True], [True, False, True], [True, True, False]]))
    for key, value in out.stats.items():
        assert value.dim() == 0 and not value.requires_grad, key
    assert float(out.stats["sdtps/gate_scale_h0"]) == pytest.approx(0.3)
    assert float(out.stats["sdtps/gate_bias_h3"]) == pytest.approx(0.7)
    assert float(out.stats["sdtps/kept_ratio"]) == pytest.approx(6 / 12)
    lo, hi = _sigmoid(-0.3 + 0.7), _sigmoid(0.3 + 0.7)
    for h in range(4):
        assert lo - 1e-6 <= float(out.stats[f"sdtps/gate_min_h{h}"]) <= float(out.stats[f"sdtps/gate_mean_h{h}"])
        assert float(out.stats[f"sdtps/gate_mean_h{h}"]) <= float(out.stats[f"sdtps/gate_max_h{h}"]) <= hi + 1e-6
    assert 0 < float(out.stats["sdtps/score_entropy"]) <= math.log(12) + 1e-6


def _per_pair_reference(model: SDTPS, cls: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor | None):
    """SDTPS as nine CrossModalAttention calls and one TokenSparse per modality (the formulas of the docstring)."""
    names = model.modalities
    tokens, keep, scores = [], [], []
    for ip, p in enumerate(names):
        terms, weights = [], []
        for iq, q in enumerate(names):
            terms.append(model.attn[f"{q}_to_{p}"](cls[iq], patches[ip])[0].mean(1))
            present = torch.ones(cls.shape[1], dtype=torch.bool) if mask is None else mask[:, iq]
            weights.append((present | (iq == ip)).to(cls.dtype))
        score = sum(w[:, None] * t for w, t in zip(weights, terms)) / sum(weights)[:, None]
        sel, idx = model.token_sparse(patches[ip], score)
        tokens.append(sel)
        keep.append(idx)
        scores.append(score)
    return torch.stack(tokens), torch.stack(keep), torch.stack(scores)


@pytest.mark.parametrize("gate_norm,renorm,qkv_bias,masked", [(False, False, True, True), (True, False, True, False),
                                                              (False, True, False, True)])
def test_batched_pairs_equal_nine_attention_calls_in_float64(gate_norm: bool, renorm: bool, qkv_bias: bool,
                                                             masked: bool) -> None:
    """Outputs and every gradient of the batched forward equal the per-pair computation (float64)."""
    torch.manual_seed(5)
    model = SDTPS(16, num_heads=4, keep_ratio=0.5, use_gate_norm=gate_norm, renormalize_attn=renorm).double()
    for attn in model.attn.values():
        if not qkv_bias:
            attn.q_proj.bias = attn.k_proj.bias = None
        with torch.no_grad():
            for param in attn.parameters():
                param.add_(0.3 * torch.randn_like(param))  # every pair different, gates away from their init
    cls, patches = (x.double().requires_grad_() for x in _sdtps_inputs(b=4, n=9))
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, True], [True, True, False]])
    mask = mask if masked else None
    probe = torch.randn(3, 4, 6, 16, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)

    def run(forward):
        model.zero_grad()
        cls.grad = patches.grad = None
        tokens, keep, scores = forward()
        ((tokens * probe[0]).sum() + (scores * probe[1]).sum()).backward()
        grads = [cls.grad.clone(), patches.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        return tokens.detach(), keep, scores.detach(), grads

    def batched():
        out = model(cls, patches, mask)
        return out.tokens, out.keep_indices, out.scores

    got, want = run(batched), run(lambda: _per_pair_reference(model, cls, patches, mask))
    assert torch.equal(got[1], want[1])
    for a, b in [(got[0], want[0]), (got[2], want[2]), *zip(got[3], want[3])]:
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_public_path_re_exports_the_implementation() -> None:
    import modeling.module.token_selection as impl
    import modeling.sdtps as public

    for name in public.__all__:
        assert getattr(public, name) is getattr(impl, name), name
    assert {"SDTPS", "CrossModalAttention", "TokenSparse"} <= set(public.__all__)
