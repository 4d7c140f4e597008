"""CLIP ViT backbone: shapes, SDPA, equivalence with open_clip, SIE, pos-embed resizing, local weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling.backbones.clip_vit import (
    CLIP_VIT_CONFIGS,
    CLIPVisionBackbone,
    load_clip_visual_weights,
    patch_embed,
    resize_pos_embed,
)
from modeling.clip_checkpoint import ClipWeightsError
from modeling.registry import BACKBONE_REGISTRY

TINY = CLIP_VIT_CONFIGS["ViT-tiny"]


def _open_clip_tiny(image_size: tuple[int, int] | int, custom: bool = False) -> nn.Module:
    """A reference open_clip tower built without our code (default block: nn.MultiheadAttention)."""
    vision_cfg = dict(TINY["vision_cfg"], image_size=image_size)
    if custom:
        vision_cfg["block_type"] = "custom"
    text_cfg = {"context_length": 4, "vocab_size": 10, "width": 16, "heads": 2, "layers": 1}
    model = open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=TINY["embed_dim"],
                                   vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    return model


def test_registered_tiny_backbone_shapes() -> None:
    bb = BACKBONE_REGISTRY.build("clip_vit_tiny", image_size=(64, 32), num_cameras=3)
    assert bb.patch_grid == (4, 2) and bb.num_patches == 8 and bb.embed_dim == 64 and bb.width == 64
    out = bb(torch.randn(2, 3, 64, 32), torch.tensor([0, 2]))
    assert out.shape == (2, 9, 64)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in bb.modules())


def test_registered_small_backbone_sees_the_vit_b16_grid_at_half_size() -> None:
    # patch 8 at 128x64 gives ViT-B/16's 16x8 grid at 256x128: what the GPU ablation tables rely on
    bb = BACKBONE_REGISTRY.build("clip_vit_small", image_size=(128, 64), num_cameras=4)
    assert bb.patch_grid == (16, 8) and bb.num_patches == 128 and bb.embed_dim == 256 and bb.width == 256
    assert sum(isinstance(m, nn.LayerNorm) for m in bb.modules()) >= 2 * 4  # 4 residual blocks
    out = bb(torch.randn(2, 3, 128, 64), torch.tensor([0, 3]))
    assert out.shape == (2, 129, 256) and torch.isfinite(out).all()


def test_attention_runs_through_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    bb = CLIPVisionBackbone("ViT-tiny", (64, 32))
    calls = {"n": 0}
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = torch.randn(2, 3, 64, 32)
    bb.train()
    bb(x).sum().backward()
    assert calls["n"] == TINY["vision_cfg"]["layers"]
    bb.eval()
    with torch.no_grad():
        bb(x)
    assert calls["n"] == 2 * TINY["vision_cfg"]["layers"]


def test_sdpa_blocks_reuse_open_clip_weights_exactly() -> None:
    """Our (custom-block, SDPA) tower gives the default nn.MultiheadAttention tower's output, same keys."""
    torch.manual_seed(0)
    ref = _open_clip_tiny((64, 32)).visual.eval()
    bb = CLIPVisionBackbone("ViT-tiny", (64, 32)).eval()
    assert set(bb.visual.state_dict()) == set(ref.state_dict())
    bb.visual.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        tokens = bb(x)
        pooled = ref(x)  # open_clip: ln_post(CLS) @ proj
        emb = torch.randn(2, 9, 64)
        ours_t, ref_t = bb.visual.transformer(emb), ref.transformer(emb)
    assert torch.allclose(ours_t, ref_t, atol=1e-5)
    assert torch.allclose(tokens[:, 0], pooled, atol=1e-5)


@pytest.mark.parametrize("where", ["cls", "all"])
def test_camera_embedding(where: str) -> None:
    bb = CLIPVisionBackbone("ViT-tiny", (64, 32), num_cameras=4, sie_coe=2.0, sie_tokens=where)
    seen: list[torch.Tensor] = []
    bb.visual.ln_pre.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = torch.randn(1, 3, 64, 32).expand(2, -1, -1, -1)
    bb(x, torch.tensor([0, 3]))
    diff = seen[0][1] - seen[0][0]  # (1 + N, width)
    expected = 2.0 * (bb.camera_embed[3] - bb.camera_embed[0]).detach()
    assert torch.allclose(diff[0], expected, atol=1e-6)
    if where == "cls":
        assert diff[1:].abs().max() == 0
    else:
        assert torch.allclose(diff[1:], expected.expand_as(diff[1:]), atol=1e-6)
    with pytest.raises(ValueError, match="cam_ids"):
        bb(x)


def test_wrong_image_size_is_a_clear_error() -> None:
    bb = CLIPVisionBackbone("ViT-tiny", (64, 32))
    with pytest.raises(ValueError, match="INPUT_SIZE|built for"):
        bb(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        CLIPVisionBackbone("ViT-tiny", (60, 32))


@pytest.mark.parametrize("size", [(32, 48), (37, 50)])  # the second leaves rows and columns over, as conv drops
def test_patch_embed_is_each_patch_dotted_with_the_kernel(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=(16, 8), stride=(16, 8), bias=True).double()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    grid = (size[0] // 16, size[1] // 8)
    out = patch_embed(conv, images, grid, size)
    assert out.shape == (2, grid[0] * grid[1], 5)
    for i in range(grid[0]):
        for j in range(grid[1]):
            patch = images[:, :, 16 * i: 16 * i + 16, 8 * j: 8 * j + 8]
            expected = torch.einsum("bchw,ochw->bo", patch, conv.weight) + conv.bias
            torch.testing.assert_close(out[:, i * grid[1] + j], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, conv(images).flatten(2).transpose(1, 2), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="built for"):
        patch_embed(conv, images[:, :, :16], grid, size)


def test_resize_pos_embed_against_bilinear_formula() -> None:
    # old grid 4x4 whose value is the row index (channel 0) and the column index (channel 1)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pos = torch.cat([torch.tensor([[7.0, -7.0]]), torch.stack([rows, cols], -1).reshape(16, 2)])
    out = resize_pos_embed(pos, (8, 2))
    assert out.shape == (17, 2) and out[0].tolist() == [7.0, -7.0]
    grid = out[1:].reshape(8, 2, 2)

    def src(dst: int, scale: float, size: int) -> float:  # align_corners=False source coordinate
        return float(np.clip((dst + 0.5) * scale - 0.5, 0, size - 1))

    for r in range(8):
        assert grid[r, :, 0].tolist() == pytest.approx([src(r, 4 / 8, 4)] * 2, abs=1e-5)
    for c in range(2):
        assert grid[:, c, 1].tolist() == pytest.approx([src(c, 4 / 2, 4)] * 8, abs=1e-5)
    assert torch.equal(resize_pos_embed(pos, (4, 4)), pos)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1 + 12, 2), (4, 2))


def _openai_style_state_dict(image_size: int = 64) -> dict[str, torch.Tensor]:
    """Keys as in OpenAI's ViT-B-16.pt (``visual.*``, text-tower keys and its three scalar entries), fp16."""
    model = _open_clip_tiny(image_size)
    extra = {"input_resolution": torch.tensor(image_size), "context_length": torch.tensor(4),
             "vocab_size": torch.tensor(10)}
    return {**{k: v.half() for k, v in model.state_dict().items()}, **extra}


def test_load_openai_style_state_dict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    sd = _openai_style_state_dict()
    path = tmp_path / "ViT-tiny-openai.pt"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="modeling.backbones.clip_vit"):
        bb = CLIPVisionBackbone("ViT-tiny", (64, 32), num_cameras=2, pretrain_path=str(path))
    own = bb.visual.state_dict()
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    for key, value in visual.items():
        if key == "positional_embedding":
            assert own[key].shape == (1 + 8, 64)
            assert torch.allclose(own[key], resize_pos_embed(value.float(), (4, 2)), atol=1e-3)
        else:
            assert torch.equal(own[key], value.float()), key
    assert own["conv1.weight"].dtype == torch.float32
    assert "resized positional embedding" in caplog.text and "loaded" in caplog.text
    assert "random initialisation" not in caplog.text


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_load_open_clip_checkpoint_and_torchscript(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    model = _open_clip_tiny((64, 32))
    # open_clip training checkpoint: {'epoch', 'state_dict': {'module.visual....'}}; one key removed
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if k != "visual.ln_post.bias"}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": sd}, path)
    bb = CLIPVisionBackbone("ViT-tiny", (64, 32))
    with caplog.at_level(logging.WARNING, logger="modeling.backbones.clip_vit"):
        missing, unexpected = load_clip_visual_weights(bb.visual, path)
    assert missing == ["ln_post.bias"] and unexpected == []
    assert "ln_post.bias" in caplog.text
    assert torch.equal(bb.visual.conv1.weight, model.visual.conv1.weight)

    # TorchScript archive (the OpenAI file is one): a traced module holding ``visual``
    class Holder(nn.Module):
        def __init__(self, visual: nn.Module) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    ts_path = tmp_path / "traced.pt"
    traced = torch.jit.trace(Holder(model.visual.eval()), torch.randn(1, 3, 64, 32), check_trace=False)
    torch.jit.save(traced, str(ts_path))
    bb2 = CLIPVisionBackbone("ViT-tiny", (64, 32), pretrain_path=str(ts_path))
    for key, value in model.visual.state_dict().items():
        assert torch.equal(bb2.visual.state_dict()[key], value), key


def test_bad_weight_files_fail_clearly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        CLIPVisionBackbone("ViT-tiny", (64, 32), pretrain_path=str(tmp_path / "nope.pt"))
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ClipWeightsError, match="holds no CLIP tensors"):
        CLIPVisionBackbone("ViT-tiny", (64, 32), pretrain_path=str(other))
    wrong = tmp_path / "wrong.pt"
    torch.save(_openai_style_state_dict(), wrong)
    with pytest.raises(ClipWeightsError, match="conv1.weight|shape"):
        CLIPVisionBackbone("ViT-B-16", (64, 32), pretrain_path=str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ClipWeightsError, match="not a readable weights file") as info:
        CLIPVisionBackbone("ViT-tiny", (64, 32), pretrain_path=str(garbage))
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)  # never the unsafe advice
    trained = tmp_path / "checkpoint_epoch0010.pth"
    torch.save({"format_version": 1, "model": {"backbone.visual.conv1.weight": torch.zeros(1)}, "optimizer": {}},
               trained)
    with pytest.raises(ClipWeightsError, match=r"trained here, not CLIP weights: --resume .* MODEL.WEIGHTS"):
        CLIPVisionBackbone("ViT-tiny", (64, 32), pretrain_path=str(trained))
    with caplog.at_level(logging.WARNING, logger="modeling.backbones.clip_vit"):
        CLIPVisionBackbone("ViT-tiny", (64, 32))
    assert "random initialisation" in caplog.text


def test_vit_b16_geometry_at_reid_resolution() -> None:
    bb = BACKBONE_REGISTRY.build("clip_vit_b16", image_size=(256, 128), num_cameras=15)
    assert bb.patch_grid == (16, 8) and bb.num_patches == 128 and bb.embed_dim == 512 and bb.width == 768
    assert tuple(bb.visual.positional_embedding.shape) == (129, 768)
    assert tuple(bb.camera_embed.shape) == (15, 768)
    assert sum(p.numel() for p in bb.visual.parameters()) == 86_140_416  # OpenAI ViT-B/16 visual, 129 positions
