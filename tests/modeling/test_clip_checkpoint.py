"""CLIP weight files: each accepted format gives, in both towers, what open_clip's own loader gives.

A small CLIP with OpenAI's key names (2 layers, width 128, 64-wide heads as OpenAI's loader
infers them) is written in each format from random weights; the reference for each format is
open_clip's loader for it (``load_openai_model`` for the TorchScript archive,
``build_model_from_openai_state_dict`` for OpenAI's state dict, ``create_model("local-dir:...")``
for open_clip's folder layout). Built with the other activation, every feature moves by far more
than the tolerance, so a swapped activation fails these tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_lp
from safetensors.torch import save_file
from torch import nn

from engine.config import ConfigError, load_config
from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.clip_checkpoint import OPENAI_EXTRA_KEYS, inspect_clip_file, resolve_quick_gelu
from modeling.module.semantic_anchors import embedding_cache_file, encode_class_names

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
VISUAL = {"embed_dim": CFG["embed_dim"], "vision_cfg": CFG["vision_cfg"]}
NAMES = ["goldfish", "great white shark", "tabby cat"]
TEMPLATE = "a photo of a {}."
TEXT_TOL, IMAGE_TOL = 1e-6, 1e-5  # fp32 rounding (the image tower runs SDPA, the reference nn.MultiheadAttention)
SWAP_MIN = 1e-3  # the smallest change a swapped activation must cause for these tests to be able to see it

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit, deprecated but OpenAI's format


def _random_clip(quick_gelu: bool, seed: int) -> nn.Module:
    """CLIP with weights large enough that the activation's shape matters (x3 on every matrix)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CFG, quick_gelu=quick_gelu)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


def _openai_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """OpenAI's release: matrices fp16, norms fp32, plus its three scalar entries."""
    model = _random_clip(quick_gelu=True, seed=seed)
    convert_weights_to_lp(model, torch.float16)
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    return {**model.state_dict(), **extra}


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``state`` (the shape of OpenAI's ``ViT-B-16.pt``)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not isinstance(getattr(node, name, None), nn.Module):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        node.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def _write_open_clip_folder(folder: Path, model: nn.Module, quick_gelu: bool, safetensors: bool) -> Path:
    folder.mkdir()
    cfg = {**CFG, "quick_gelu": True} if quick_gelu else CFG
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        path = folder / "open_clip_model.safetensors"
        save_file(state, str(path))
    else:
        path = folder / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module, bool]]:
    """``{format: (weights file, open_clip's model loaded from it by its own loader, QuickGELU?)}``."""
    root = tmp_path_factory.mktemp("clip_files")
    out: dict[str, tuple[Path, nn.Module, bool]] = {}

    ts = root / "ViT-B-16.pt"
    _save_torchscript(_openai_state_dict(seed=0), ts)
    out["openai-torchscript"] = (ts, open_clip.load_openai_model(str(ts), precision="fp32", device="cpu"), True)

    sd_path = root / "openai_state_dict.pt"
    state = _openai_state_dict(seed=1)
    torch.save(state, sd_path)
    ref = build_model_from_openai_state_dict(dict(state), cast_dtype=torch.float16).float().eval()
    out["openai-state-dict"] = (sd_path, ref, True)

    for name, quick, safe in [("open_clip-bin", False, False), ("open_clip-safetensors", False, True),
                              ("open_clip-quickgelu", True, False)]:
        path = _write_open_clip_folder(root / name, _random_clip(quick, seed=len(out) + 2), quick, safe)
        out[name] = (path, open_clip.create_model(f"local-dir:{path.parent}").eval(), quick)
    return out


def _reference_text(model: nn.Module) -> torch.Tensor:
    tokens = open_clip.tokenize([TEMPLATE.format(n) for n in NAMES])
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def _our_text(path: Path, cache: Path, activation: str = "auto") -> torch.Tensor:
    model_json = cache.parent / "model.json"
    model_json.write_text(json.dumps(CFG))
    return encode_class_names(NAMES, str(model_json), str(path), TEMPLATE, cache, activation=activation)


def _our_image(path: Path, images: torch.Tensor, activation: str = "auto") -> torch.Tensor:
    tower = CLIPVisionBackbone(VISUAL, (32, 32), pretrain_path=str(path), activation=activation).eval()
    with torch.no_grad():
        return F.normalize(tower(images)[:, 0], dim=-1)


FORMATS = ["openai-torchscript", "openai-state-dict", "open_clip-bin", "open_clip-safetensors", "open_clip-quickgelu"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_both_towers_match_open_clips_own_loader(files, fmt: str, tmp_path: Path) -> None:
    path, ref, quick = files[fmt]
    assert isinstance(ref.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU) == quick
    text = _our_text(path, tmp_path / "cache")
    assert (text - _reference_text(ref)).abs().max().item() <= TEXT_TOL

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_image = F.normalize(ref.encode_image(images), dim=-1)
    assert (_our_image(path, images) - ref_image).abs().max().item() <= IMAGE_TOL

    # the other activation is visible at these tolerances: a swapped activation fails the checks above
    other = "gelu" if quick else "quick_gelu"
    assert (_our_text(path, tmp_path / "cache", other) - _reference_text(ref)).abs().max().item() > SWAP_MIN
    assert (_our_image(path, images, other) - ref_image).abs().max().item() > SWAP_MIN


def test_the_format_and_activation_read_from_each_file(files) -> None:
    expected = {"openai-torchscript": ("openai-torchscript", True), "openai-state-dict": ("openai-state-dict", True),
                "open_clip-bin": ("open_clip", False), "open_clip-safetensors": ("open_clip", False),
                "open_clip-quickgelu": ("open_clip", True)}
    for fmt, (path, _, _) in files.items():
        info = inspect_clip_file(path)
        assert (info.format, info.quick_gelu) == expected[fmt], fmt


def test_a_file_that_does_not_say_needs_the_key(files, tmp_path: Path) -> None:
    state = {k: v for k, v in torch.load(files["openai-state-dict"][0], weights_only=True).items()
             if k not in OPENAI_EXTRA_KEYS}
    bare = tmp_path / "bare.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, bare)
    assert inspect_clip_file(bare).quick_gelu is None
    with pytest.raises(ValueError, match="MODEL.CLIP_ACTIVATION quick_gelu"):
        CLIPVisionBackbone(VISUAL, (32, 32), pretrain_path=str(bare))
    with pytest.raises(ValueError, match="MODEL.CLIP_ACTIVATION"):
        _our_text(bare, tmp_path / "cache")
    # named, the same weights give OpenAI's loader's features
    ref = files["openai-state-dict"][1]
    text = _our_text(bare, tmp_path / "cache", "quick_gelu")
    assert (text - _reference_text(ref)).abs().max().item() <= TEXT_TOL


def test_the_choice_is_logged(files, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    path = files["openai-torchscript"][0]
    with caplog.at_level(logging.INFO):
        CLIPVisionBackbone(VISUAL, (32, 32), pretrain_path=str(path))
    assert f"from {path}: OpenAI format (TorchScript archive), QuickGELU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        CLIPVisionBackbone(VISUAL, (32, 32), pretrain_path=str(path), activation="gelu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "GELU (MODEL.CLIP_ACTIVATION gelu); the file implies QuickGELU" in warnings[0].getMessage()


def test_random_init_keeps_quick_gelu_and_bad_values_are_named() -> None:
    tower = CLIPVisionBackbone("ViT-tiny", (64, 32))
    assert tower.quick_gelu and isinstance(tower.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert not CLIPVisionBackbone("ViT-tiny", (64, 32), activation="gelu").quick_gelu
    with pytest.raises(ValueError, match="MODEL.CLIP_ACTIVATION must be one of"):
        resolve_quick_gelu("quickgelu")


def test_anchor_cache_is_keyed_by_the_activation(files, tmp_path: Path) -> None:
    path, ref, _ = files["openai-state-dict"]
    model_json = str(tmp_path / "model.json")
    cache = tmp_path / "cache"
    # a cache file at the key the activation-blind scheme used, holding anchors of the wrong tower
    st = path.stat()
    old_ident = json.dumps([model_json, str(path.resolve()), st.st_size, st.st_mtime_ns, TEMPLATE])
    old_file = cache / f"clip_text_{hashlib.sha1(old_ident.encode()).hexdigest()[:16]}.pt"
    cache.mkdir()
    torch.save({"embeddings": {n: torch.zeros(CFG["embed_dim"]) for n in NAMES}}, old_file)
    text = _our_text(path, cache)
    assert (text - _reference_text(ref)).abs().max().item() <= TEXT_TOL
    quick = embedding_cache_file(cache, model_json, str(path), TEMPLATE, quick_gelu=True)
    gelu = embedding_cache_file(cache, model_json, str(path), TEMPLATE, quick_gelu=False)
    assert quick.is_file() and quick != gelu and quick != old_file
    assert torch.load(quick, weights_only=True)["activation"] == "QuickGELU"


def test_the_old_activation_key_names_its_new_place(tmp_path: Path) -> None:
    cfg_file = tmp_path / "old.yml"
    cfg_file.write_text("MODEL:\n  QUICK_GELU: False\n")
    with pytest.raises(ConfigError, match="MODEL.QUICK_GELU' has moved: use MODEL.CLIP_ACTIVATION"):
        load_config(cfg_file)
    assert load_config(None, ["MODEL.CLIP_ACTIVATION", "gelu"]).MODEL.CLIP_ACTIVATION == "gelu"
