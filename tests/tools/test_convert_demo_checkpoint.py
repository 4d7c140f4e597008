"""modeling/demo_checkpoint.py (the key mapping) and tools/convert_demo_checkpoint.py (the CLI), tiny tower.

The DeMo state dicts are generated from DeMo's key names and shapes (``modeling/make_model.py``,
``modeling/moe/AttnMOE.py``, ``modeling/clip/model.py`` of 924973292/DeMo), not from its code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import Checkpointer
from engine.config import load_config
from engine.reid import build_reid_model
from modeling.demo_checkpoint import ConversionError, TowerShape, convert_state_dict, infer_architecture
from modeling.module.atm import quick_gelu
from tools import convert_demo_checkpoint as conv

WIDTH, LAYERS, PATCH, D = 64, 2, 16, 64  # clip_vit_tiny
SIZE = [64, 32]  # 4 x 2 = 8 patches
CLASSES, CAMS, HEAD = 5, 3, 4
OPTS = ["MODEL.BACKBONE", "clip_vit_tiny", "INPUT.SIZE_TRAIN", str(SIZE), "INPUT.SIZE_TEST", str(SIZE)]
SUBSETS = ("r", "n", "t", "rn", "rt", "nt", "rnt")


def _bn(prefix: str, n: int, g: torch.Generator, out: dict[str, torch.Tensor]) -> None:
    out[prefix + "weight"] = torch.randn(n, generator=g)
    out[prefix + "bias"] = torch.randn(n, generator=g)
    out[prefix + "running_mean"] = torch.randn(n, generator=g)
    out[prefix + "running_var"] = torch.rand(n, generator=g) + 0.5
    out[prefix + "num_batches_tracked"] = torch.tensor(7)


def demo_state_dict(direct: bool = True, atm: bool = True, sie: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under DeMo's names and shapes (GLOBAL_LOCAL and HDM on, ViT-tiny-sized CLIP tower)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    t = "BACKBONE.base."
    grid = (SIZE[0] // PATCH) * (SIZE[1] // PATCH)
    sd[t + "class_embedding"], sd[t + "positional_embedding"] = r(WIDTH), r(grid + 1, WIDTH)
    sd[t + "proj"], sd[t + "conv1.weight"] = r(WIDTH, D), r(WIDTH, 3, PATCH, PATCH)
    for ln in ("ln_pre", "ln_post"):
        sd[f"{t}{ln}.weight"], sd[f"{t}{ln}.bias"] = 1 + r(WIDTH), r(WIDTH)
    for i in range(LAYERS):
        b = f"{t}transformer.resblocks.{i}."
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = r(3 * WIDTH, WIDTH), r(3 * WIDTH)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = r(WIDTH, WIDTH), r(WIDTH)
        for ln in ("ln_1", "ln_2"):
            sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + r(WIDTH), r(WIDTH)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = r(4 * WIDTH, WIDTH), r(4 * WIDTH)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = r(WIDTH, 4 * WIDTH), r(WIDTH)
    if sie:
        sd["BACKBONE.cv_embed"] = r(CAMS, 1, WIDTH)
    for m in ("rgb", "nir", "tir"):
        sd[f"{m}_reduce.0.weight"], sd[f"{m}_reduce.0.bias"] = 1 + r(2 * D), r(2 * D)
        sd[f"{m}_reduce.1.weight"], sd[f"{m}_reduce.1.bias"] = r(D, 2 * D), r(D)
    for s in SUBSETS:
        sd[f"generalFusion.{s}_token"] = r(1, 1, D)
        sd[f"generalFusion.{s}.in_proj_weight"], sd[f"generalFusion.{s}.in_proj_bias"] = r(3 * D, D), r(3 * D)
        sd[f"generalFusion.{s}.out_proj.weight"], sd[f"generalFusion.{s}.out_proj.bias"] = r(D, D), r(D)
    if atm:
        c = D // HEAD
        for h in range(HEAD):
            for e in range(7):
                b = f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp."
                sd[b + "0.weight"], sd[b + "0.bias"] = r(c, c), r(c)
                _bn(b + "2.", c, g, sd)
        gate = "generalFusion.moe.gating_network.gate."
        sd[gate + "linear_re.0.weight"], sd[gate + "linear_re.0.bias"] = r(D, 7 * D), r(D)
        _bn(gate + "linear_re.2.", D, g, sd)
        sd[gate + "q_.weight"], sd[gate + "k_.weight"] = r(D, D), r(D, D)
    sd["classifier_moe.weight"] = r(CLASSES, 7 * D)
    _bn("bottleneck_moe.", 7 * D, g, sd)
    if direct:
        sd["classifier.weight"] = r(CLASSES, 3 * D)
        _bn("bottleneck.", 3 * D, g, sd)
    else:
        for m in "rnt":
            sd[f"classifier_{m}.weight"] = r(CLASSES, D)
            _bn(f"bottleneck_{m}.", D, g, sd)
    return sd


def _convert(demo: dict[str, torch.Tensor], *extra: str) -> tuple[nn.Module, dict[str, torch.Tensor], list[str]]:
    arch = infer_architecture(demo)
    cfg, _ = conv.resolve_config(arch, "", [*OPTS, *extra])
    model = conv.build_target_model(cfg)
    converted, kept = convert_state_dict(demo, model.state_dict(), arch)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted, kept


@pytest.fixture(scope="module")
def converted() -> tuple[dict[str, torch.Tensor], nn.Module, dict[str, torch.Tensor], list[str]]:
    demo = demo_state_dict()
    model, out, kept = _convert(demo)
    return demo, model, out, kept


def test_inferred_architecture() -> None:
    arch = infer_architecture(demo_state_dict(direct=False, sie=False))
    assert (arch.num_classes, arch.num_cameras, arch.head) == (CLASSES, 0, HEAD)
    assert arch.global_local and arch.hdm and arch.atm and not arch.direct
    assert arch.tower == TowerShape(WIDTH, LAYERS, PATCH, D, 8)


def test_tensors_land_where_the_mapping_says(converted: Any) -> None:
    demo, _, out, kept = converted
    assert sorted(kept) == ["hdm.null_features", "null_tokens"]
    c = D // HEAD
    for e, h in [(0, 0), (3, 2), (6, 3)]:
        src = f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp."
        assert torch.equal(out["atm.expert_weight"][e, h], demo[src + "0.weight"])
        assert torch.equal(out["atm.expert_bias"][e, h], demo[src + "0.bias"])
        for stat in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(out[f"atm.expert_bn.{stat}"][e * D + h * c:e * D + (h + 1) * c], demo[src + "2." + stat])
    assert int(out["atm.expert_bn.num_batches_tracked"]) == 7
    for i, s in enumerate(SUBSETS):
        assert torch.equal(out[f"hdm.queries.{i}.query"], demo[f"generalFusion.{s}_token"].reshape(D))
        assert torch.equal(out[f"hdm.queries.{i}.in_proj_weight"], demo[f"generalFusion.{s}.in_proj_weight"])
        assert torch.equal(out[f"hdm.queries.{i}.out_proj.bias"], demo[f"generalFusion.{s}.out_proj.bias"])
    assert torch.equal(out["backbone.camera_embed"], demo["BACKBONE.cv_embed"][:, 0])
    assert torch.equal(out["backbone.visual.transformer.resblocks.1.mlp.c_fc.weight"],
                       demo["BACKBONE.base.transformer.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(out["global_local.reduce.2.1.weight"], demo["tir_reduce.1.weight"])
    assert torch.equal(out["atm.gate_reduce.2.running_var"],
                       demo["generalFusion.moe.gating_network.gate.linear_re.2.running_var"])
    assert torch.equal(out["atm.gate_k.weight"], demo["generalFusion.moe.gating_network.gate.k_.weight"])
    assert torch.equal(out["direct_head.bn.running_mean"], demo["bottleneck.running_mean"])
    assert torch.equal(out["moe_head.classifier.weight"], demo["classifier_moe.weight"])


def test_atm_matches_demo_formula(converted: Any) -> None:
    """Our batched ATM equals DeMo's per-(chunk, expert) Linear -> QuickGELU -> BN, gated by the chunk's
    softmax over experts of ``q_(linear_re(cat)) . k_(feat) / sqrt(c)``, concatenated expert-major."""
    demo, model, _, _ = converted
    feats = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    c = D // HEAD
    gate = "generalFusion.moe.gating_network.gate."

    def bn(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(x, demo[p + "running_mean"], demo[p + "running_var"], demo[p + "weight"], demo[p + "bias"])

    q = F.linear(bn(quick_gelu(F.linear(feats.flatten(1), demo[gate + "linear_re.0.weight"],
                                        demo[gate + "linear_re.0.bias"])), gate + "linear_re.2."),
                 demo[gate + "q_.weight"]).reshape(3, HEAD, c)
    k = F.linear(feats, demo[gate + "k_.weight"]).reshape(3, 7, HEAD, c)
    gates = (torch.einsum("bhc,behc->bhe", q, k) / c**0.5).softmax(-1)
    expected = torch.zeros(3, 7, D)
    for h in range(HEAD):
        for e in range(7):
            p = f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp."
            y = bn(quick_gelu(F.linear(feats[:, e, h * c:(h + 1) * c], demo[p + "0.weight"], demo[p + "0.bias"])), p + "2.")
            expected[:, e, h * c:(h + 1) * c] = y * gates[:, h, e, None]
    with torch.no_grad():
        res = model.atm(feats)
        got, got_gates = res.feat, res.gates
    torch.testing.assert_close(got_gates, gates)
    torch.testing.assert_close(got, expected.flatten(1))


def test_hdm_query_matches_multihead_attention(converted: Any) -> None:
    """Subset ``rn`` of our HDM equals DeMo's ``nn.MultiheadAttention(rn_token, [RGB; NI], [RGB; NI])``."""
    demo, model, _, _ = converted
    tokens = torch.randn(3, 2, 9, D, generator=torch.Generator().manual_seed(2))  # (M, B, 1 + N, D)
    mha = nn.MultiheadAttention(D, max(1, D // 64)).eval()
    mha.load_state_dict({k.split(".", 2)[2]: v for k, v in demo.items() if k.startswith("generalFusion.rn.")})
    keys = torch.cat([tokens[0], tokens[1]], dim=1).transpose(0, 1)  # (L, B, D)
    with torch.no_grad():
        expected = mha(demo["generalFusion.rn_token"].expand(1, 2, D), keys, keys)[0][0]
        got = model.hdm(tokens)[:, 3]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("direct,atm", [(False, True), (True, False)])
def test_other_demo_switches_convert(direct: bool, atm: bool) -> None:
    demo = demo_state_dict(direct=direct, atm=atm, sie=False)
    model, out, _ = _convert(demo)
    assert (model.direct_head is None) == (not direct) and (model.atm is None) == (not atm)
    assert model.backbone.camera_embed is None
    if not direct:
        assert torch.equal(out["modality_heads.NI.classifier.weight"], demo["classifier_n.weight"])
        assert torch.equal(out["modality_heads.TI.bn.running_var"], demo["bottleneck_t.running_var"])


def _target(demo: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    arch = infer_architecture(demo)
    cfg, _ = conv.resolve_config(arch, "", OPTS)
    return arch, conv.build_target_model(cfg).state_dict()


def test_leftover_source_key_is_an_error() -> None:
    demo = demo_state_dict()
    arch, target = _target(demo)
    demo["BACKBONE.base.transformer.resblocks.0.adapter_prompt_rgb"] = torch.zeros(4, WIDTH)
    with pytest.raises(ConversionError, match=r"1 DeMo tensor\(s\) have no place.*adapter_prompt_rgb"):
        convert_state_dict(demo, target, arch)


def test_missing_target_key_is_an_error() -> None:
    demo = demo_state_dict()
    arch, target = _target(demo)
    del demo["generalFusion.rt.out_proj.bias"], demo["generalFusion.moe.experts.1.expertHead.5.mlp.2.num_batches_tracked"]
    with pytest.raises(ConversionError, match=r"2 tensor\(s\) of this model are missing") as err:
        convert_state_dict(demo, target, arch)
    assert "hdm.queries.4.out_proj.bias (from generalFusion.rt.out_proj.bias)" in str(err.value)
    assert "atm.expert_bn.num_batches_tracked" in str(err.value)


def test_misshapen_tensor_is_an_error() -> None:
    demo = demo_state_dict()
    arch, target = _target(demo)
    demo["generalFusion.moe.experts.2.expertHead.0.mlp.0.weight"] = torch.zeros(8, 8)
    demo["rgb_reduce.1.bias"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"shape mismatch for 2 tensor\(s\)") as err:
        convert_state_dict(demo, target, arch)
    assert "global_local.reduce.0.1.bias" in str(err.value) and "missing" not in str(err.value)


def test_cli_writes_a_checkpoint_that_eval_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = demo_state_dict()
    src, dst = tmp_path / "demo.pth", tmp_path / "out" / "converted.pth"
    torch.save({"module." + k: v.half() if v.is_floating_point() else v for k, v in demo.items()}, src)  # DDP, fp16
    assert conv.main([str(src), str(dst), *OPTS, "MODEL.DEMO.HEAD", "8"]) == 0
    out = capsys.readouterr().out
    assert f"MODEL.NUM_CLASSES {CLASSES}" in out and f"MODEL.NUM_CAMERAS {CAMS}" in out
    assert "MODEL.DEMO.HEAD 4" in out and "the config had 8" in out
    # what train_net.py --eval-only MODEL.WEIGHTS does
    cfg = load_config(None, ["MODEL.NAME", "DeMo", *OPTS])
    model = build_reid_model(cfg, CLASSES, CAMS)
    state = Checkpointer(tmp_path).load(dst, model=model, restore_rng=False)
    assert state["epoch"] == 0 and state["extra"]["inferred"]["MODEL.DEMO.HEAD"] == HEAD
    assert torch.equal(model.moe_head.bn.running_var, demo["bottleneck_moe.running_var"].half().float())
    # an existing output (e.g. a trained checkpoint) is never replaced unless --force says so
    before = dst.read_bytes()
    assert conv.main([str(src), str(dst), *OPTS]) == 2
    err = capsys.readouterr().err
    assert f"the output {dst} exists; nothing was written" in err and "--force" in err and err.count("\n") == 1
    assert dst.read_bytes() == before
    assert conv.main([str(src), str(dst), *OPTS, "--force"]) == 0


@pytest.mark.parametrize("case,message", [
    ("missing", "DeMo checkpoint not found"),
    ("not_demo", "is not a DeMo checkpoint"),
    ("wrong_tower", "wrong architecture: the checkpoint's CLIP tower"),
    ("wrong_model", "wrong architecture: MODEL.NAME DeMo_SDTPS"),
])
def test_cli_errors_are_one_line_with_exit_code_2(case: str, message: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "demo.pth"
    opts = list(OPTS)
    if case == "not_demo":
        torch.save({"encoder.weight": torch.zeros(2)}, src)
    elif case in ("wrong_tower", "wrong_model"):
        torch.save(demo_state_dict(), src)
        opts += ["INPUT.SIZE_TRAIN", "[128, 64]", "INPUT.SIZE_TEST", "[128, 64]"] if case == "wrong_tower" else \
            ["MODEL.NAME", "DeMo_SDTPS"]
    assert conv.main([str(src), str(tmp_path / "out.pth"), *opts]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.pth").exists()
