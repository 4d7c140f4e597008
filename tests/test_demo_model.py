"""DeMo / DeMo-SDTPS (tiny tower): output contract, ablation switches, masks, HDM/ATM/DGAF math."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.config import load_config
from modeling import build_model
from modeling.demo import DeMo
from modeling.module.atm import AttentionTriggeredMoE, quick_gelu
from modeling.module.dgaf import DualGatedFusion
from modeling.module.hdm import HDM_SUBSETS, HierarchicalDecoupling, QueryAttention

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"
NUM_CLASSES, NUM_CAMS, B = 6, 3, 4


def _cfg(*overrides: Any) -> Any:
    base = ["MODEL.NUM_CLASSES", str(NUM_CLASSES), "MODEL.NUM_CAMERAS", str(NUM_CAMS),
            "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]"]
    return load_config(TINY_CFG, [*base, *map(str, overrides)])


def _batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = {m: torch.randn(B, 3, 64, 32, generator=g) for m in ("RGB", "NI", "TI")}
    return images, torch.tensor([0, 1, 2, 0])


def _model(*overrides: Any) -> DeMo:
    torch.manual_seed(0)
    model = build_model(_cfg(*overrides))
    assert isinstance(model, DeMo)
    return model


MASK = torch.tensor([[True, True, True], [True, False, True], [True, True, False], [False, False, True]])


@pytest.mark.parametrize("use_mask", [False, True])
def test_training_output_contract_and_backward(use_mask: bool) -> None:
    model = _model().train()
    images, cams = _batch()
    out = model(images, cams, MASK if use_mask else None)
    names = [b["name"] for b in out["branches"]]
    assert names == ["fused", "moe"]  # tiny config: DGAF on
    d = model.feat_dim
    for br, dim in zip(out["branches"], (d, 7 * d)):
        assert br["logits"].shape == (B, NUM_CLASSES) and br["feat"].shape == (B, dim)
    assert out["bn_feats"].shape == (B, 8 * d)
    assert set(out["modality_feats"]) == {"RGB", "NI", "TI"}
    assert all(v.shape == (B, d) for v in out["modality_feats"].values())
    for key, value in out["stats"].items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    for key in ("sdtps/gate_mean_h0", "sdtps/kept_ratio", "sdtps/score_entropy", "dgaf/weight_RGB", "atm/gate_RGB"):
        assert key in out["stats"]
    loss = sum(nn.functional.cross_entropy(b["logits"], torch.arange(B) % NUM_CLASSES) + b["feat"].pow(2).mean()
               for b in out["branches"])
    loss.backward()
    # every trainable parameter gets a gradient (DDP without find_unused_parameters); without a
    # mask the null token and HDM's null features get an exact zero
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    if not use_mask:
        assert model.null_tokens.grad.abs().max() == 0 and model.hdm.null_features.grad.abs().max() == 0


def test_eval_output_contract() -> None:
    model = _model().eval()
    images, cams = _batch()
    with torch.no_grad():
        out = model(images, cams, MASK)
    d = model.feat_dim
    assert out["feat"].shape == (B, model.retrieval_dim) == (B, d + 7 * d)
    assert torch.equal(out["feat"], torch.cat([out["feats"]["fused"], out["feats"]["moe"]], -1))
    assert out["feats"]["modality_concat"].shape == (B, 3 * d)
    assert set(out["feats"]) == {"modality_concat", "moe", "fused", "RGB", "NI", "TI"}
    k = math.ceil(0.5 * model.num_patches)
    for m in ("RGB", "NI", "TI"):
        idx = out["keep_indices"][m]
        assert idx.shape == (B, k) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < model.num_patches
    assert model.num_patches == 8 and model.patch_grid == (4, 2)


@pytest.mark.parametrize(
    ("name", "gl", "hdm", "atm", "direct", "dgaf", "branches", "feat_mult"),
    [
        ("DeMo", False, False, False, True, False, ["direct"], 3),  # baseline row
        ("DeMo", True, False, False, True, False, ["direct"], 3),  # + GLOBAL_LOCAL
        ("DeMo", True, True, False, True, False, ["direct", "moe"], 10),  # + HDM
        ("DeMo", True, True, True, True, False, ["direct", "moe"], 10),  # full DeMo
        ("DeMo", True, True, True, False, False, ["RGB", "NI", "TI", "moe"], 10),  # DIRECT 0 (RGBNT100)
        ("DeMo_SDTPS", True, True, True, True, False, ["direct", "moe"], 10),
        ("DeMo_SDTPS", True, True, True, True, True, ["fused", "moe"], 8),
    ],
)
def test_ablation_switches(name: str, gl: bool, hdm: bool, atm: bool, direct: bool, dgaf: bool,
                           branches: list[str], feat_mult: int) -> None:
    model = _model("MODEL.NAME", name, "MODEL.DEMO.GLOBAL_LOCAL", gl, "MODEL.DEMO.HDM", hdm, "MODEL.DEMO.ATM", atm,
                   "MODEL.DEMO.DIRECT", direct, "MODEL.DGAF.ENABLED", dgaf)
    assert (model.sdtps is not None) == (name == "DeMo_SDTPS")
    images, cams = _batch()
    out = model.train()(images, cams)
    assert [b["name"] for b in out["branches"]] == branches
    model.eval()
    with torch.no_grad():
        ev = model(images, cams)
    assert ev["feat"].shape == (B, feat_mult * model.feat_dim)
    assert (ev["keep_indices"] is None) == (name == "DeMo")


def test_atm_without_hdm_is_refused() -> None:
    with pytest.raises(ValueError, match="ATM needs"):
        _model("MODEL.DEMO.HDM", False)


def test_missing_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(_cfg("MODEL.NUM_CLASSES", 0))
    with pytest.raises(ValueError, match="NUM_CAMERAS"):
        build_model(_cfg("MODEL.NUM_CAMERAS", 0))
    with pytest.raises(ValueError, match="SIZE_TEST"):
        build_model(_cfg("INPUT.SIZE_TEST", "[128, 64]"))
    model = _model()
    images, cams = _batch()
    with pytest.raises(KeyError, match="TI"):
        model({"RGB": images["RGB"], "NI": images["NI"]}, cams)


def test_missing_modality_content_is_ignored() -> None:
    """A masked-out image cannot change any output of its sample (null tokens, masked scores/gates)."""
    model = _model().eval()
    images, cams = _batch()
    with torch.no_grad():
        ref = model(images, cams, MASK)
        other = {m: v.clone() for m, v in images.items()}
        other["NI"][1] = 5 * torch.randn(3, 64, 32)  # sample 1 misses NI
        other["RGB"][3] = 5 * torch.randn(3, 64, 32)  # sample 3 misses RGB and NI
        other["NI"][3] = -3.0
        got = model(other, cams, MASK)
    assert torch.allclose(got["feat"], ref["feat"], atol=1e-5)
    assert torch.equal(got["keep_indices"]["RGB"][1], ref["keep_indices"]["RGB"][1])
    # and an unmasked image does change its sample
    other["TI"][0] = 5 * torch.randn(3, 64, 32)
    with torch.no_grad():
        changed = model(other, cams, MASK)
    assert not torch.allclose(changed["feat"][0], ref["feat"][0], atol=1e-3)


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


class _RepeatedIndexWatch:
    """Records every accumulating index_put whose index repeats: its backward-time additions into one place run
    as CPU atomics in thread order, so a run would not reproduce bit for bit."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        repeated = self.repeated = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
                if func.__name__.split(".")[0] in ("index_put", "index_put_", "_index_put_impl_") and accumulate:
                    index = torch.stack(torch.broadcast_tensors(*[i for i in args[1] if i is not None])).flatten(1)
                    if torch.unique(index, dim=1).shape[1] < index.shape[1]:
                        repeated.append(tuple(args[0].shape))
                return func(*args, **kwargs)

        self.mode = Mode()


def test_hdm_backward_adds_no_index_twice() -> None:
    torch.manual_seed(6)
    hdm = HierarchicalDecoupling(32, dropout=0.0)
    tokens = torch.randn(3, 4, 5, 32, requires_grad=True)
    watch = _RepeatedIndexWatch()
    with watch.mode:
        hdm(tokens, MASK).sum().backward()
    assert not watch.repeated, watch.repeated
    assert tokens.grad is not None and all(p.grad is not None for p in hdm.parameters())


def test_model_backward_adds_no_index_twice() -> None:
    """The whole DeMo-SDTPS forward and loss-free backward, two samples per camera (the SIE lookup repeats)."""
    model = _model("MODEL.DGAF.ENABLED", True).train()
    images, cams = _batch()
    watch = _RepeatedIndexWatch()
    with watch.mode:
        out = model(images, cams, MASK)
        sum(branch["logits"].sum() + branch["feat"].sum() for branch in out["branches"]).backward()
    assert cams.unique().numel() < cams.numel() and not watch.repeated, watch.repeated


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


def test_atm_matches_per_expert_loop() -> None:
    """The batched experts give DeMo's MoM (loop over chunks and experts, same weights, same layout)."""
    torch.manual_seed(3)
    atm = AttentionTriggeredMoE(32, num_experts=7, num_heads=4).train()
    feats = torch.randn(5, 7, 32)
    out, gates = atm(feats)
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


def test_dgaf_gates_and_initial_fusion() -> None:
    torch.manual_seed(4)
    dgaf = DualGatedFusion(16, 3)
    feats = torch.randn(4, 3, 16)
    fused, w, c = dgaf(feats, MASK)
    present = MASK.float()
    assert torch.allclose(w, present / present.sum(1, keepdim=True))  # uniform over present at init
    assert torch.allclose(c, torch.full_like(c, 0.5))
    ref = (feats * present[..., None]).sum(1) / present.sum(1, keepdim=True)  # masked mean
    assert torch.allclose(fused, ref, atol=1e-6)
    # once trained: weights still sum to 1 over present modalities and 0 on missing ones
    with torch.no_grad():
        for p in dgaf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused, w, _ = dgaf(feats, MASK)
    assert torch.allclose(w.sum(1), torch.ones(4)) and bool((w[~MASK] == 0).all())
    alt = feats.clone()
    alt[~MASK] = 100.0
    assert torch.allclose(dgaf(alt, MASK)[0], fused, atol=1e-5)
    assert torch.isfinite(dgaf(feats, torch.zeros(4, 3, dtype=torch.bool))[0]).all()


def test_param_groups_cover_every_trainable_parameter_once() -> None:
    model = _model()
    groups = model.param_groups(base_lr=5e-5, weight_decay=5e-4, backbone_lr=1e-5)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable
    by_name = {g["name"]: g for g in groups}
    visual = {id(p) for p in model.backbone.visual.parameters()}
    assert {id(p) for p in by_name["backbone"]["params"] + by_name["backbone_no_decay"]["params"]} == visual
    assert by_name["backbone"]["lr"] == 1e-5 and by_name["new"]["lr"] == 5e-5
    assert by_name["new_no_decay"]["weight_decay"] == 0.0 and by_name["new"]["weight_decay"] == 5e-4
    no_decay = {id(p) for p in by_name["new_no_decay"]["params"] + by_name["backbone_no_decay"]["params"]}
    for attn in model.sdtps.attn.values():
        assert id(attn.gate_scale) in no_decay and id(attn.gate_bias) in no_decay
        assert id(attn.q_proj.weight) not in no_decay
    assert id(model.backbone.visual.positional_embedding) in no_decay
    assert id(model.backbone.camera_embed) in {id(p) for p in by_name["new_no_decay"]["params"]}


def test_forward_backward_make_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item()/.tolist()/bool()/float() on tensors inside forward or backward."""
    model = _model().train()
    images, cams = _batch()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync in the model")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = model(images, cams, MASK)
    loss = sum(b["logits"].sum() + b["feat"].sum() for b in out["branches"])
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)


def test_atm_gate_and_norm_stats_match_their_formulas() -> None:
    model = _model().train()
    captured: dict[str, torch.Tensor] = {}
    model.atm.register_forward_hook(lambda _m, _i, out: captured.update(gates=out[1].detach().double(),
                                                                         moe=out[0].detach().double()))
    images, cams = _batch()
    stats = model(images, cams)["stats"]
    g = captured["gates"]  # (B, heads, 7)
    entropy = float(-(g * g.log()).sum(-1).mean())
    assert float(stats["atm/gate_entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(stats["atm/gate_max"]) == pytest.approx(float(g.max(-1).values.mean()), rel=1e-5)
    assert 0.0 < entropy <= math.log(7) + 1e-9
    assert float(stats["norm/moe"]) == pytest.approx(float(captured["moe"].norm(dim=1).mean()), rel=1e-5)
    assert float(stats["norm/direct"]) > 0
