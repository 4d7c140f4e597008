"""DeMo / DeMo-SDTPS (tiny tower): output contract, ablation switches, masks, stats, parameter groups."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.config import load_config
from modeling import build_model
from modeling.demo import DeMo
from tests.helpers.repeated_index import RepeatedIndexWatch

REPO = Path(__file__).resolve().parents[2]
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


def test_model_backward_adds_no_index_twice() -> None:
    """The whole DeMo-SDTPS forward and loss-free backward, two samples per camera (the SIE lookup repeats)."""
    model = _model("MODEL.DGAF.ENABLED", True).train()
    images, cams = _batch()
    watch = RepeatedIndexWatch()
    with watch.mode:
        out = model(images, cams, MASK)
        sum(branch["logits"].sum() + branch["feat"].sum() for branch in out["branches"]).backward()
    assert cams.unique().numel() < cams.numel() and not watch.repeated, watch.repeated


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
    model.atm.register_forward_hook(lambda _m, _i, out: captured.update(gates=out.gates.detach().double(),
                                                                         moe=out.feat.detach().double()))
    images, cams = _batch()
    stats = model(images, cams)["stats"]
    g = captured["gates"]  # (B, heads, 7)
    entropy = float(-(g * g.log()).sum(-1).mean())
    assert float(stats["atm/gate_entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(stats["atm/gate_max"]) == pytest.approx(float(g.max(-1).values.mean()), rel=1e-5)
    assert 0.0 < entropy <= math.log(7) + 1e-9
    assert float(stats["norm/moe"]) == pytest.approx(float(captured["moe"].norm(dim=1).mean()), rel=1e-5)
    assert float(stats["norm/direct"]) > 0


def test_the_tower_trains_with_the_fixed_order_kernels_only_when_a_deterministic_run_asks() -> None:
    """``DETERMINISTIC_ATTENTION triton`` (the default) gives the CLIP tower the fixed-order kernels under
    ``DETERMINISTIC``; a free run keeps SDPA (cuDNN's forward and backward together are faster, and nothing needs
    the fixed order there), and so do ``fused`` and ``math``."""
    assert _model("DETERMINISTIC", True).backbone.attention == "fixed_order"
    assert _model("DETERMINISTIC", False).backbone.attention == "sdpa"
    for kernels in ("fused", "math"):
        assert _model("DETERMINISTIC", True, "DETERMINISTIC_ATTENTION", kernels).backbone.attention == "sdpa"


def test_a_gpu_older_than_ampere_keeps_torchs_deterministic_attention(monkeypatch, caplog) -> None:
    """Triton's bf16 matmuls need compute capability 8.0: a Turing GPU gets SDPA, with a warning naming why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level(logging.WARNING):
        assert _model("DETERMINISTIC", True).backbone.attention == "sdpa"
    assert "predates Ampere" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert _model("DETERMINISTIC", True).backbone.attention == "fixed_order"


def test_evaluation_kernels_follow_their_keys_unless_the_gpu_is_too_old(monkeypatch, caplog) -> None:
    """``TEST.TRITON_ATTENTION`` and ``TEST.FUSED_MLP`` (both on by default) reach the tower; on a pre-Ampere GPU
    both stay off, with a warning; on an Ampere GPU the attention kernels run and the fused MLP (measured faster
    only where the Tensor Memory Accelerator reads its tiles) stays off, with a log line."""
    tower = _model().backbone
    assert tower.eval_attention and tower.eval_fused_mlp
    tower = _model("TEST.TRITON_ATTENTION", False, "TEST.FUSED_MLP", False).backbone
    assert not tower.eval_attention and not tower.eval_fused_mlp
    tower = _model("TEST.TRITON_ATTENTION", False).backbone
    assert not tower.eval_attention and tower.eval_fused_mlp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level(logging.WARNING):
        tower = _model().backbone
    assert not tower.eval_attention and not tower.eval_fused_mlp
    assert "TEST.TRITON_ATTENTION" in caplog.text and "predates Ampere" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with caplog.at_level(logging.INFO):
        tower = _model().backbone
    assert tower.eval_attention and not tower.eval_fused_mlp
    assert "TEST.FUSED_MLP" in caplog.text and "predates Hopper" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _model().backbone.eval_fused_mlp
