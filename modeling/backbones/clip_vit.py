"""CLIP ViT image tower (open_clip) at ReID resolution, with camera SIE, returning every token.

The architecture is open_clip's own ``VisionTransformer``, described as data
(:data:`CLIP_VIT_CONFIGS`, the same dicts as open_clip's ``model_configs/*.json``) and built
by ``open_clip.create_model(..., pretrained=None)`` then ``.visual``; only the image tower is
kept (the text tower is configured to a few hundred parameters and dropped). Three things
differ from a stock CLIP image encoder, as in CLIP-ReID / DeMo:

* **Resolution.** The tower is built at the ReID size (256x128 -> a 16x8 grid of 16x16 patches,
  128 patch tokens); pretrained 14x14 positional embeddings are resized bilinearly
  (:func:`resize_pos_embed`, DeMo's ``resize_pos_embed``) when the weights are loaded.
* **Attention through SDPA.** ``vision_cfg['block_type'] = 'custom'`` makes open_clip use its
  ``CustomResidualAttentionBlock`` / ``Attention``, which calls
  ``torch.nn.functional.scaled_dot_product_attention`` in training and inference (the default
  block wraps ``nn.MultiheadAttention``, whose fused fast path runs only in inference without
  grad). With none of the custom options on, the custom block has exactly the state-dict keys
  of the default one (``attn.in_proj_weight``, ``attn.out_proj.weight`` ...), so OpenAI and
  open_clip checkpoints load unchanged.
* **Camera embedding (SIE).** A learnable ``(num_cameras, width)`` table, scaled by
  ``sie_coe``, is added to the class token (DeMo / CLIP-ReID: ``x[:, 0] += coe * cv_embed[cam]``,
  trunc-normal std 0.02) or, with ``sie_tokens='all'``, to every token (TransReID style).

``forward`` returns all tokens of the last layer after ``ln_post`` and ``proj``, shape
``(B, 1 + N, embed_dim)`` (DeMo uses the projected 512-d tokens of ViT-B/16).

Weights come only from a local file (``MODEL.PRETRAIN_PATH``): the OpenAI ``ViT-B-16.pt``
(a TorchScript archive with fp16 weights), a plain state dict, ``.safetensors``, or an open_clip
training checkpoint (``{'state_dict': {'module.visual....': ...}}``), read by
:mod:`modeling.clip_checkpoint`, which also decides the activation the tower is built with
(QuickGELU for OpenAI's files; ``MODEL.CLIP_ACTIVATION``). Without a path the tower keeps
open_clip's random initialisation and a warning is logged. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeling.clip_checkpoint import (
    ClipWeightsError,
    inspect_clip_file,
    log_choice,
    read_clip_state_dict,
    resolve_quick_gelu,
)
from modeling.layers.fixed_order_attention import fixed_order_or_sdpa
from modeling.layers.quick_gelu_linear import quick_gelu_linear_or_torch
from modeling.layers.triton_device import HALF_DTYPES, triton_runs_on
from modeling.registry import BACKBONE_REGISTRY

__all__ = ["CLIPVisionBackbone", "load_clip_visual_weights", "read_clip_state_dict", "resize_pos_embed"]

logger = logging.getLogger(__name__)

#: open_clip model configs (the ``model_configs/*.json`` format) of the towers we build.
#: ``ViT-B-16`` is open_clip's own; ``ViT-tiny`` is a 2-layer, width-64, 4-head tower for CPU tests;
#: ``ViT-small-8`` (4 layers, width 256, patch 8) trains from random init in GPU minutes: at 128x64 it
#: sees the same 16x8 patch grid as ViT-B/16 at 256x128, for less than half the loader cost
#: (766 vs 324 samples/s per core, BENCHMARKS.md).
CLIP_VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"layers": 12, "width": 768, "head_width": 64, "patch_size": 16},
    },
    "ViT-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    },
    "ViT-small-8": {
        "embed_dim": 256,
        "vision_cfg": {"layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    },
}

# Only the image tower is used; a minimal text tower keeps create_model from allocating CLIP's 63M text weights.
_UNUSED_TEXT_CFG: dict[str, Any] = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}

SIE_TOKENS = ("cls", "all")
#: ``attention``: torch's scaled-dot-product attention, or the fixed-order kernels in training (see the class)
TOWER_ATTENTION = ("sdpa", "fixed_order")


def create_open_clip_visual(
    model_cfg: Mapping[str, Any],
    image_size: Sequence[int],
    quick_gelu: bool = True,
) -> nn.Module:
    """Build open_clip's ``VisionTransformer`` from a model config dict at ``image_size`` (H, W).

    ``model_cfg`` has ``embed_dim`` and ``vision_cfg`` (open_clip's JSON format). The block type
    is forced to ``'custom'`` so attention runs through ``F.scaled_dot_product_attention``.
    ``quick_gelu`` must be True for OpenAI weights (they were trained with QuickGELU).
    """
    vision_cfg = dict(copy.deepcopy(model_cfg["vision_cfg"]))
    vision_cfg["image_size"] = (int(image_size[0]), int(image_size[1]))
    vision_cfg["block_type"] = "custom"
    patch = int(vision_cfg["patch_size"])
    if vision_cfg["image_size"][0] % patch or vision_cfg["image_size"][1] % patch:
        raise ValueError(f"image size {tuple(image_size)} is not a multiple of the patch size {patch}")
    import open_clip  # heavy (pulls in timm/hf glue); only needed when a tower is built

    with _quiet_open_clip_root_logs():
        clip = open_clip.create_model(
            "ViT-B-16",  # only names the base config; every field below overrides it
            pretrained=None,
            embed_dim=int(model_cfg["embed_dim"]),
            vision_cfg=vision_cfg,
            text_cfg=dict(_UNUSED_TEXT_CFG),
            quick_gelu=quick_gelu,
        )
    return clip.visual


class _DropOpenClipInfo(logging.Filter):
    """Drop open_clip's below-ERROR root-logger records (e.g. its "initialized randomly" for the
    base config name, which would misname the tower; this module logs the weight status itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or os.sep + "open_clip" + os.sep not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip_root_logs() -> Iterator[None]:
    root = logging.getLogger()
    flt = _DropOpenClipInfo()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


# ----------------------------------------------------------------------------------------------
# Loading weights from a local file
# ----------------------------------------------------------------------------------------------
def resize_pos_embed(
    posemb: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int] | None = None,
) -> torch.Tensor:
    """Resize a ``(1 + H*W, D)`` positional embedding (class token first) to ``new_grid`` (H', W').

    The class-token row is kept; the grid is interpolated bilinearly (``align_corners=False``,
    as DeMo / CLIP-ReID). ``old_grid`` defaults to a square grid. Returns ``(1 + H'*W', D)``.
    """
    cls_tok, grid = posemb[:1], posemb[1:]
    n_old = grid.shape[0]
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(
                f"positional embedding has {n_old} grid tokens, not a square grid; pass old_grid=(H, W)"
            )
        old_grid = (side, side)
    gh, gw = int(old_grid[0]), int(old_grid[1])
    nh, nw = int(new_grid[0]), int(new_grid[1])
    if gh * gw != n_old:
        raise ValueError(f"old_grid {gh}x{gw} does not match {n_old} grid tokens")
    if (gh, gw) == (nh, nw):
        return posemb.clone()
    dtype = posemb.dtype
    g = grid.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(nh, nw), mode="bilinear", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(nh * nw, -1).to(dtype)
    return torch.cat([cls_tok, g], dim=0)


def visual_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Keep the image tower of a CLIP state dict (``visual.`` keys, stripped).

    A state dict with no ``visual.`` key is taken to be an image tower already. Returns the
    tower's dict and the number of other (e.g. text-tower) tensors dropped.
    """
    if not any(k.startswith("visual.") for k in state):
        return dict(state), 0
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return visual, len(state) - len(visual)


def load_clip_visual_weights(visual: nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Load a local CLIP checkpoint into an open_clip ``VisionTransformer`` (in place).

    Resizes the positional embedding to the tower's grid, casts to the tower's dtype, logs
    how many tensors were loaded and every missing / unexpected key. Returns
    ``(missing_keys, unexpected_keys)``. Raises if no tensor of the tower was found, and on a
    shape mismatch (naming the key).
    """
    state, n_other = visual_state_dict(read_clip_state_dict(path))
    own = visual.state_dict()
    if "positional_embedding" in state and state["positional_embedding"].shape != own["positional_embedding"].shape:
        old = state["positional_embedding"]
        state["positional_embedding"] = resize_pos_embed(old, visual.grid_size)
        logger.info(
            "resized positional embedding %s -> %s (grid %s)",
            tuple(old.shape), tuple(state["positional_embedding"].shape), tuple(visual.grid_size),
        )
    matched = [k for k in state if k in own]
    if not matched:
        raise ClipWeightsError(
            f"'{path}' has no tensor of a CLIP image tower (expected keys like 'visual.conv1.weight'); "
            f"first keys: {list(state)[:5]}"
        )
    for key in matched:
        if state[key].shape != own[key].shape:
            raise ClipWeightsError(
                f"'{path}': '{key}' has shape {tuple(state[key].shape)}, the tower expects {tuple(own[key].shape)} "
                f"(wrong architecture for MODEL.BACKBONE?)"
            )
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = visual.load_state_dict(state, strict=False)
    logger.info(
        "loaded %d CLIP image-tower tensors from %s (%d non-image tensors ignored)", len(matched), path, n_other
    )
    if result.missing_keys:
        logger.warning("CLIP image tower: %d keys missing in %s: %s", len(result.missing_keys), path,
                       result.missing_keys)
    if result.unexpected_keys:
        logger.warning("CLIP image tower: %d unexpected keys in %s: %s", len(result.unexpected_keys), path,
                       result.unexpected_keys)
    return list(result.missing_keys), list(result.unexpected_keys)


# ----------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------
class CLIPVisionBackbone(nn.Module):
    """open_clip CLIP image tower with SIE, returning projected tokens ``(B, 1 + N, embed_dim)``.

    Args:
        arch: a key of :data:`CLIP_VIT_CONFIGS` (``ViT-B-16``, ``ViT-tiny``) or an open_clip-style
            model config dict (``embed_dim``, ``vision_cfg``).
        image_size: input (H, W); the patch grid is ``(H // patch, W // patch)``.
        num_cameras: rows of the SIE table; 0 disables SIE.
        sie_coe: SIE coefficient (DeMo's RGBNT201/RGBNT100/MSVR310 configs use 1.0).
        sie_tokens: ``'cls'`` (DeMo, CLIP-ReID) or ``'all'`` tokens receive the camera embedding.
        activation: ``auto`` (from the weights file; QuickGELU at random init) | ``quick_gelu`` |
            ``gelu`` (``MODEL.CLIP_ACTIVATION``, see :mod:`modeling.clip_checkpoint`).
        pretrain_path: local checkpoint; ``''`` keeps random init (with a logged warning).
        attention: ``sdpa`` (open_clip's blocks, torch's SDPA) or ``fixed_order``: in fp16/bf16 (or autocast) on a
            device the kernels run on, the blocks' attention runs
            :func:`~modeling.layers.fixed_order_attention.fixed_order_or_sdpa`: the fixed-order kernels, whose
            backward pass is deterministic without torch's slower deterministic variants and whose forward pass
            is faster than cuDNN's at 129 tokens (``DETERMINISTIC_ATTENTION triton``); elsewhere (fp32, the CPU)
            the tower runs as with ``sdpa``.
        eval_attention: with no gradient recorded (evaluation), in fp16/bf16 on a device the kernels run on, the
            blocks' attention runs the fixed-order kernels' forward pass whatever ``attention`` says (faster than
            cuDNN's at 129 tokens; ``TEST.TRITON_ATTENTION``).
        eval_fused_mlp: likewise in evaluation, a QuickGELU MLP's first layer and activation run as one kernel
            (:mod:`modeling.layers.quick_gelu_linear`; ``TEST.FUSED_MLP``).

    Attributes: ``width`` (transformer width), ``embed_dim`` (output dim), ``patch_grid``
    ``(H', W')``, ``num_patches`` ``H' * W'``, ``visual`` (the open_clip module; its parameters
    are the pretrained ones), ``camera_embed`` (new, or ``None``).
    """

    def __init__(
        self,
        arch: str | Mapping[str, Any] = "ViT-B-16",
        image_size: Sequence[int] = (256, 128),
        num_cameras: int = 0,
        sie_coe: float = 1.0,
        sie_tokens: str = "cls",
        activation: str = "auto",
        pretrain_path: str = "",
        attention: str = "sdpa",
        eval_attention: bool = False,
        eval_fused_mlp: bool = False,
    ) -> None:
        super().__init__()
        if attention not in TOWER_ATTENTION:
            raise ValueError(f"attention must be one of {TOWER_ATTENTION}, got '{attention}'")
        if isinstance(arch, str):
            if arch not in CLIP_VIT_CONFIGS:
                raise ValueError(f"unknown CLIP ViT arch '{arch}' (known: {sorted(CLIP_VIT_CONFIGS)})")
            model_cfg: Mapping[str, Any] = CLIP_VIT_CONFIGS[arch]
        else:
            model_cfg = arch
        if sie_tokens not in SIE_TOKENS:
            raise ValueError(f"sie_tokens must be one of {SIE_TOKENS}, got '{sie_tokens}'")
        arch_name = arch if isinstance(arch, str) else "custom config"
        info = None
        if pretrain_path:
            if not os.path.isfile(pretrain_path):
                raise FileNotFoundError(
                    f"MODEL.PRETRAIN_PATH '{pretrain_path}' does not exist; give the local CLIP ViT-B-16 weights "
                    f"(OpenAI ViT-B-16.pt or an open_clip checkpoint), or '' for random initialisation"
                )
            info = inspect_clip_file(pretrain_path)
        quick_gelu = resolve_quick_gelu(activation, info)
        log_choice(logger, "image tower", arch_name, info, quick_gelu, activation)
        self.quick_gelu = quick_gelu
        self.visual = create_open_clip_visual(model_cfg, image_size, quick_gelu=quick_gelu)
        self.attention = attention
        self.eval_attention = bool(eval_attention)
        self.eval_fused_mlp = bool(eval_fused_mlp) and quick_gelu
        if eval_fused_mlp and not quick_gelu:
            logger.warning("the fused MLP kernel computes QuickGELU; this tower uses GELU, so its MLP evaluates with "
                           "torch's kernels")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.width = int(self.visual.conv1.out_channels)
        self.embed_dim = int(self.visual.proj.shape[1])
        self.patch_grid: tuple[int, int] = (int(self.visual.grid_size[0]), int(self.visual.grid_size[1]))
        self.num_patches = self.patch_grid[0] * self.patch_grid[1]
        self.sie_coe = float(sie_coe)
        self.sie_tokens = sie_tokens
        self.camera_embed: nn.Parameter | None
        if num_cameras > 0:
            self.camera_embed = nn.Parameter(torch.zeros(num_cameras, self.width))
            nn.init.trunc_normal_(self.camera_embed, std=0.02)
        else:
            self.camera_embed = None
        if pretrain_path:
            load_clip_visual_weights(self.visual, pretrain_path)
        else:
            logger.warning(
                "MODEL.PRETRAIN_PATH is empty: the CLIP image tower (%s) starts from random initialisation", arch_name
            )

    def forward(self, images: torch.Tensor, cam_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (B, 3, H, W), ``cam_ids`` (B,) long -> tokens (B, 1 + N, embed_dim), CLS first."""
        v = self.visual
        x = patch_embed(v.conv1, images, self.patch_grid, self.image_size)  # (B, N, width)
        b = x.shape[0]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, 1, -1)
        sie = None
        if self.camera_embed is not None:
            if cam_ids is None:
                raise ValueError("cam_ids (B,) is required when the camera embedding (MODEL.SIE_CAMERA) is on")
            # F.embedding, not camera_embed[cam_ids]: the index's backward adds repeated cameras with CPU atomics
            sie = (self.sie_coe * F.embedding(cam_ids, self.camera_embed)).to(x.dtype).unsqueeze(1)  # (B, 1, width)
            if self.sie_tokens == "cls":
                cls = cls + sie
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        if sie is not None and self.sie_tokens == "all":
            x = x + sie
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        no_grad = not torch.is_grad_enabled()
        fixed_order = self.attention == "fixed_order" or (self.eval_attention and no_grad)
        fused_mlp = self.eval_fused_mlp and no_grad
        if (fixed_order or fused_mlp) and _half(x) and triton_runs_on(x.device):
            x = self.blocks(x, fixed_order_or_sdpa if fixed_order else F.scaled_dot_product_attention, fused_mlp)
        else:
            x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj.to(x.dtype)

    def blocks(self, x: torch.Tensor,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = F.scaled_dot_product_attention,
               fused_mlp: bool = False) -> torch.Tensor:
        """The tower's residual blocks with ``attend(q, k, v)`` ((B, H, N, D) each) as their attention: what
        open_clip's blocks compute (no mask, no dropout in attention), with the kernel chosen here. ``fused_mlp``:
        a QuickGELU MLP's first layer runs :func:`~modeling.layers.quick_gelu_linear.quick_gelu_linear_or_torch`
        (one kernel, forward only). ``x`` (B, N, width) -> (B, N, width)."""
        fused_mlp = fused_mlp and self.quick_gelu
        for block in self.visual.transformer.resblocks:
            attn = block.attn
            b, n, c = x.shape
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, attn.num_heads, -1)
            q, k, v = qkv.unbind(2)
            y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(b, n, c)
            x = x + block.ls_1(block.ln_attn(attn.out_drop(attn.out_proj(attn.ln_inner(y)))))
            mlp = block.mlp
            if fused_mlp:
                h = mlp.c_proj(mlp.ln(quick_gelu_linear_or_torch(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias)))
            else:
                h = mlp(block.ln_2(x))
            x = x + block.ls_2(h)
        return x

    def matmul_only_parameters(self) -> list[nn.Parameter]:
        """The parameters only matmuls read (the patch embedding, each block's four linear layers, the projection):
        evaluation under autocast may hold them as half copies (:mod:`modeling.layers.half_weights`)."""
        v = self.visual
        params = [v.conv1.weight, v.proj]
        for block in v.transformer.resblocks:
            attn, mlp = block.attn, block.mlp
            params += [attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                       mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]
        return [p for p in params if p is not None]

    def pretrained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters that come from the CLIP checkpoint (everything under ``visual``)."""
        return [(f"visual.{n}", p) for n, p in self.visual.named_parameters()]


def patch_embed(conv: nn.Conv2d, images: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]
                ) -> torch.Tensor:
    """``conv`` (the tower's patchifying convolution: kernel = stride, no padding) applied to ``images``
    (B, C, H, W) as one matmul over the flattened patches -> (B, H' * W', width), row-major over the grid.

    The same sums as the convolution (what is left over at the bottom and right edges is dropped, as the
    convolution drops it), in one GEMM: cuDNN runs this stride-16 convolution in bf16 at a few percent of the
    GPU's matmul rate (1.8 of an evaluation batch's 24 ms, BENCHMARKS.md)."""
    b, c, h, w = images.shape
    ph, pw = conv.kernel_size
    gh, gw = h // ph, w // pw
    if (gh, gw) != grid:
        raise ValueError(f"images of size {(h, w)} give a {(gh, gw)} patch grid; this backbone was built for "
                         f"{image_size} (grid {grid}, MODEL.INPUT_SIZE)")
    patches = images[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _half(x: torch.Tensor) -> bool:
    """Whether the blocks' matmuls run in fp16/bf16: half inputs, or autocast to half on ``x``'s device."""
    if x.dtype in HALF_DTYPES:
        return True
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in HALF_DTYPES


def _build(arch: str, **kwargs: Any) -> CLIPVisionBackbone:
    return CLIPVisionBackbone(arch=arch, **kwargs)


@BACKBONE_REGISTRY.register("clip_vit_b16")
def clip_vit_b16(**kwargs: Any) -> CLIPVisionBackbone:
    """CLIP ViT-B/16 image tower (width 768, 12 layers, 12 heads, 512-d projected tokens)."""
    return _build("ViT-B-16", **kwargs)


@BACKBONE_REGISTRY.register("clip_vit_tiny")
def clip_vit_tiny(**kwargs: Any) -> CLIPVisionBackbone:
    """Tiny CLIP-style tower for CPU tests (width 64, 2 layers, 4 heads, 64-d tokens, patch 16)."""
    return _build("ViT-tiny", **kwargs)


@BACKBONE_REGISTRY.register("clip_vit_small")
def clip_vit_small(**kwargs: Any) -> CLIPVisionBackbone:
    """Small CLIP-style tower for GPU ablations from random init (width 256, 4 layers, 4 heads, patch 8)."""
    return _build("ViT-small-8", **kwargs)
