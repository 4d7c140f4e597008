"""DeMo and DeMo-SDTPS: multi-modal (RGB / NI / TI) object ReID on a shared CLIP ViT.

DeMo (AAAI 2025, 924973292/DeMo, ``modeling/make_model.py`` and ``modeling/moe/AttnMOE.py``)
as published, with its parts switchable for the paper's ablation rows:

* one CLIP image tower shared by the three modalities (one batched pass of 3B images),
  camera SIE, giving a class token and N patch tokens per image (D = 512 for ViT-B/16);
* ``GLOBAL_LOCAL``: per-modality ``LN -> Linear(2D, D) -> QuickGELU`` of ``[CLS, mean(patches)]``
  (off: the CLS token);
* ``HDM``: seven subset queries over ``[global; patches]`` (:mod:`modeling.module.hdm`);
* ``ATM``: mixture of experts over the seven features (:mod:`modeling.module.atm`); HDM without
  ATM concatenates the seven (DeMo does the same); ATM needs HDM;
* heads: BNNeck (BatchNorm with frozen bias) + bias-free classifier on the concatenated
  modality features (``DIRECT``; otherwise one head per modality) and on the MoE feature.

On top: **SDTPS** (:mod:`modeling.module.token_selection`) between the backbone and HDM -- HDM sees each
modality's global feature, its top-K patches and one merged token -- and **DGAF**
(:mod:`modeling.module.dgaf`), which replaces the concatenation of modality features by a
gated fusion (the DIRECT head then sits on the fused feature).

Missing modalities (``modality_mask[b, m] == False``): after the backbone, every token of that
image is replaced by a learned per-modality null token; SDTPS leaves the modality out of the
other modalities' cross scores, DGAF gives it zero weight, HDM masks its tokens out of the keys
and a subset with no present modality returns HDM's learned null feature. (DeMo's own protocol,
zeroed images with no mask, is what ``modality_mask=None`` on zeroed inputs does; ``None`` means
all present and runs the same masked code path.)

Output contract of ``forward(images, cam_ids, modality_mask)``:

* training: ``branches`` (list of ``{"name", "logits" (B, C), "feat" (B, D_i)}``; ID loss on the
  logits, triplet on the pre-BN feat), ``modality_feats`` ({m: (B, D)}), ``bn_feats`` (B, sum D_i)
  (all BNNeck outputs, concatenated), ``stats`` ({name: detached 0-d tensor});
* eval: ``feat`` (B, D_total) = ``[concat or fused modality features, MoE feature]`` (DeMo's test
  feature, before BN), ``feats`` (named alternatives: ``modality_concat``, ``moe``, ``fused``,
  ``RGB``, ``NI``, ``TI``), ``keep_indices`` ({m: (B, K)} with SDTPS, else ``None``), ``stats``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modeling.backbones.clip_vit import CLIPVisionBackbone
from modeling.layers.quick_gelu_linear import fused_mlp_fits_this_gpu
from modeling.layers.triton_device import triton_fits_this_gpu
from modeling.module.atm import AttentionTriggeredMoE, QuickGELU
from modeling.module.dgaf import DualGatedFusion
from modeling.module.hdm import HDM_SUBSETS, HierarchicalDecoupling, subset_name
from modeling.module.token_selection import SDTPS
from modeling.param_groups import DEFAULT_RULES, ParamRules, rule_groups
from modeling.registry import BACKBONE_REGISTRY, MODEL_REGISTRY
from utils.modalities import MODALITIES

logger = logging.getLogger(__name__)


def _triton_kernels_fit(asked_by: str, instead: str) -> bool:
    """Whether this machine's GPU (if any) runs the repository's Triton kernels; if it predates Ampere, a warning
    names the key that asked for them (``asked_by``) and what runs ``instead``."""
    if triton_fits_this_gpu():
        return True
    logger.warning("%s: this GPU (capability %s) predates Ampere, which the Triton kernels need; %s", asked_by,
                   torch.cuda.get_device_capability(), instead)
    return False


def _tower_attention(cfg: Any) -> str:
    """``fixed_order`` for a ``DETERMINISTIC`` run with ``DETERMINISTIC_ATTENTION triton`` on a GPU the kernels
    are built for; ``sdpa`` (torch's deterministic fused kernels under ``DETERMINISTIC``) otherwise."""
    if not (cfg.DETERMINISTIC and cfg.DETERMINISTIC_ATTENTION == "triton"):
        return "sdpa"
    fits = _triton_kernels_fit("DETERMINISTIC_ATTENTION triton", "the CLIP tower runs torch's deterministic "
                               "attention instead (as with DETERMINISTIC_ATTENTION fused)")
    return "fixed_order" if fits else "sdpa"


def _eval_kernels(cfg: Any) -> tuple[bool, bool]:
    """(``TEST.TRITON_ATTENTION``, ``TEST.FUSED_MLP``), each on only where asked and on a GPU the Triton kernels
    are built for (the CPU keeps torch's kernels whatever they say); the fused MLP only from Hopper on, where it
    was measured faster than torch's."""
    attention, fused_mlp = bool(cfg.TEST.TRITON_ATTENTION), bool(cfg.TEST.FUSED_MLP)
    if (attention or fused_mlp) and not _triton_kernels_fit("TEST.TRITON_ATTENTION / TEST.FUSED_MLP",
                                                            "evaluation runs torch's kernels"):
        return False, False
    if fused_mlp and not fused_mlp_fits_this_gpu():
        logger.info("TEST.FUSED_MLP: this GPU (capability %s) predates Hopper, where the fused MLP kernel was "
                    "slower than torch's matmul and QuickGELU apart; evaluation runs torch's MLP",
                    torch.cuda.get_device_capability())
        fused_mlp = False
    return attention, fused_mlp


#: Parameter names (last component) kept out of weight decay besides biases and 1-D tensors.
NO_DECAY_NAMES = frozenset({"positional_embedding", "class_embedding", "camera_embed", "null_tokens",
                            "null_features", "query"})


class BNNeckHead(nn.Module):
    """BatchNorm (bias frozen at 0, weight 1) then a bias-free classifier (normal, std 0.001), as DeMo."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feat`` (B, D) -> ``(bn_feat (B, D), logits (B, C))``."""
        bn_feat = self.bn(feat)
        return bn_feat, self.classifier(bn_feat)


class GlobalLocal(nn.Module):
    """Per-modality ``LN(2D) -> Linear(2D, D) -> QuickGELU`` of ``[CLS, mean(patches)]`` (DeMo's PIFE)."""

    def __init__(self, dim: int, num_modalities: int = 3) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), QuickGELU()) for _ in range(num_modalities)]
        )

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``cls`` (M, B, D), ``patches`` (M, B, N, D) -> (M, B, D)."""
        local = patches.mean(dim=2)
        return torch.stack([f(torch.cat([cls[i], local[i]], dim=-1)) for i, f in enumerate(self.reduce)])


class DeMo(nn.Module):
    """DeMo / DeMo-SDTPS (see the module docstring).

    Args:
        backbone: a :class:`CLIPVisionBackbone` (its ``embed_dim`` is D).
        num_classes: training identities.
        global_local, hdm, atm: DeMo's switches (ATM requires HDM).
        atm_heads: ATM chunks (DeMo ``MODEL.HEAD``: 4 on RGBNT201).
        direct: one head on the concatenated modality features; else one per modality (with DGAF
            there is always one head, on the fused feature).
        hdm_dropout: attention dropout of the HDM queries.
        sdtps: an :class:`SDTPS` module or ``None``.
        dgaf: fuse the modality features with :class:`DualGatedFusion`.
    """

    def __init__(
        self,
        backbone: CLIPVisionBackbone,
        num_classes: int,
        global_local: bool = True,
        hdm: bool = True,
        atm: bool = True,
        atm_heads: int = 4,
        direct: bool = True,
        hdm_dropout: float = 0.1,
        sdtps: SDTPS | None = None,
        dgaf: bool = False,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive (MODEL.NUM_CLASSES), got {num_classes}")
        if atm and not hdm:
            raise ValueError("MODEL.DEMO.ATM needs MODEL.DEMO.HDM (the experts mix the seven HDM features)")
        self.modalities = tuple(modalities)
        if len(self.modalities) != 3:
            raise ValueError(f"DeMo works on three modalities, got {self.modalities}")
        m = len(self.modalities)
        self.backbone = backbone
        d = backbone.embed_dim
        self.feat_dim = d
        self.num_classes = num_classes
        self.num_patches = backbone.num_patches
        self.patch_grid = backbone.patch_grid
        self.use_hdm, self.use_atm, self.direct = hdm, atm, direct
        self.null_tokens = nn.Parameter(0.02 * torch.randn(m, d))
        self.global_local = GlobalLocal(d, m) if global_local else None
        self.sdtps = sdtps
        self.hdm = HierarchicalDecoupling(d, dropout=hdm_dropout) if hdm else None
        self.atm = AttentionTriggeredMoE(
            d, num_experts=len(HDM_SUBSETS), num_heads=atm_heads,
            expert_names=[subset_name(subset, self.modalities) for subset in HDM_SUBSETS],
        ) if atm else None
        self.dgaf = DualGatedFusion(d, m, modalities=self.modalities) if dgaf else None
        if direct or dgaf:
            self.direct_head: nn.Module | None = BNNeckHead(d if dgaf else m * d, num_classes)
            self.modality_heads: nn.ModuleDict | None = None
        else:
            self.direct_head = None
            self.modality_heads = nn.ModuleDict({name: BNNeckHead(d, num_classes) for name in self.modalities})
        self.moe_head = BNNeckHead(len(HDM_SUBSETS) * d, num_classes) if hdm else None
        self.moe_dim = len(HDM_SUBSETS) * d if hdm else 0
        self.retrieval_dim = (d if dgaf else m * d) + self.moe_dim

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        images: Mapping[str, torch.Tensor],
        cam_ids: torch.Tensor | None = None,
        modality_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """``images`` {m: (B, 3, H, W)} for m in RGB, NI, TI; ``cam_ids`` (B,); ``modality_mask`` (B, 3) bool.

        Returns the training or eval dict of the module docstring. ``stats`` holds, in this order,
        SDTPS's, ATM's and DGAF's own statistics (each part returns them) and ``norm/direct`` /
        ``norm/moe``, the mean norms of the two parts of the retrieval feature.
        """
        cls, patches, modality_mask = self._tokens(images, cam_ids, modality_mask)
        glob = self.global_local(cls, patches) if self.global_local is not None else cls  # (M, B, D)
        moe_feat, keep_indices, stats = self._decoupled_features(cls, patches, glob, modality_mask)
        modality_feats = {name: glob[i] for i, name in enumerate(self.modalities)}
        concat, fused, fusion_stats = self._fuse(glob, modality_mask)
        stats.update(fusion_stats)
        direct_feat = fused if fused is not None else concat
        stats.update(self._norm_stats(direct_feat, moe_feat))
        if not self.training:
            return self._eval_output(direct_feat, concat, fused, moe_feat, modality_feats, keep_indices, stats)
        return self._training_output(direct_feat, fused, moe_feat, modality_feats, stats)

    def _tokens(
        self,
        images: Mapping[str, torch.Tensor],
        cam_ids: torch.Tensor | None,
        modality_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One backbone pass over the 3B images; a missing modality's tokens become its null token.

        Returns ``cls`` (M, B, D), ``patches`` (M, B, N, D) and the mask (B, M) bool (all True for ``None``).
        """
        missing = [name for name in self.modalities if name not in images]
        if missing:
            raise KeyError(f"images lacks modalities {missing}; expected keys {self.modalities}")
        m = len(self.modalities)
        b = images[self.modalities[0]].shape[0]
        x = torch.cat([images[name] for name in self.modalities], dim=0)  # (M*B, 3, H, W)
        cams = cam_ids.repeat(m) if cam_ids is not None else None
        tokens = self.backbone(x, cams)
        tokens = tokens.reshape(m, b, *tokens.shape[1:])  # (M, B, 1+N, D)
        # One code path with or without a mask: an all-True mask keeps the null token and HDM's null
        # features in the autograd graph (zero gradient), so DDP sees every parameter used each step.
        if modality_mask is None:
            modality_mask = torch.ones(b, m, dtype=torch.bool, device=tokens.device)
        elif modality_mask.shape != (b, m):
            raise ValueError(f"modality_mask must be (B, {m}) = ({b}, {m}), got {tuple(modality_mask.shape)}")
        modality_mask = modality_mask.to(device=tokens.device, dtype=torch.bool)
        keep = modality_mask.t()[:, :, None, None]
        tokens = torch.where(keep, tokens, self.null_tokens[:, None, None, :].to(tokens.dtype))
        return tokens[:, :, 0], tokens[:, :, 1:], modality_mask

    def _decoupled_features(
        self, cls: torch.Tensor, patches: torch.Tensor, glob: torch.Tensor, modality_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """SDTPS token selection, then HDM's seven subset features, mixed by ATM or concatenated.

        ``cls`` (M, B, D), ``patches`` (M, B, N, D), ``glob`` (M, B, D). Returns the MoE feature
        (B, 7D) (``None`` without HDM), ``keep_indices`` ({m: (B, K)} with SDTPS, else ``None``) and
        the SDTPS and ATM statistics.
        """
        stats: dict[str, torch.Tensor] = {}
        keep_indices: dict[str, torch.Tensor] | None = None
        hdm_patches = patches
        if self.sdtps is not None:
            sel = self.sdtps(cls, patches, modality_mask)
            hdm_patches = sel.tokens
            keep_indices = {name: sel.keep_indices[i] for i, name in enumerate(self.modalities)}
            stats.update(sel.stats)
        if self.hdm is None:
            return None, keep_indices, stats
        parts = self.hdm(torch.cat([glob.unsqueeze(2), hdm_patches], dim=2), modality_mask)  # (B, 7, D)
        if self.atm is None:
            return parts.flatten(1), keep_indices, stats
        moe = self.atm(parts)
        stats.update(moe.stats)
        return moe.feat, keep_indices, stats

    def _fuse(
        self, glob: torch.Tensor, modality_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """``glob`` (M, B, D) -> ``(concat (B, M*D), fused (B, D) with DGAF else None, DGAF's stats)``."""
        concat = glob.transpose(0, 1).reshape(glob.shape[1], -1)  # (B, M*D)
        if self.dgaf is None:
            return concat, None, {}
        fusion = self.dgaf(glob.transpose(0, 1), modality_mask)
        return concat, fusion.fused, fusion.stats

    @staticmethod
    @torch.no_grad()
    def _norm_stats(direct_feat: torch.Tensor, moe_feat: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The two parts of the retrieval feature: which one dominates its norm (mean L2 norms)."""
        stats = {"norm/direct": direct_feat.detach().float().norm(dim=1).mean()}
        if moe_feat is not None:
            stats["norm/moe"] = moe_feat.detach().float().norm(dim=1).mean()
        return stats

    @staticmethod
    def _eval_output(
        direct_feat: torch.Tensor,
        concat: torch.Tensor,
        fused: torch.Tensor | None,
        moe_feat: torch.Tensor | None,
        modality_feats: dict[str, torch.Tensor],
        keep_indices: dict[str, torch.Tensor] | None,
        stats: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """DeMo's test feature ``[direct, moe]`` and its named alternatives (module docstring)."""
        parts_out = [direct_feat] + ([moe_feat] if moe_feat is not None else [])
        feats: dict[str, torch.Tensor] = {"modality_concat": concat, **modality_feats}
        if moe_feat is not None:
            feats["moe"] = moe_feat
        if fused is not None:
            feats["fused"] = fused
        return {"feat": torch.cat(parts_out, dim=-1), "feats": feats, "keep_indices": keep_indices, "stats": stats}

    def _training_output(
        self,
        direct_feat: torch.Tensor,
        fused: torch.Tensor | None,
        moe_feat: torch.Tensor | None,
        modality_feats: dict[str, torch.Tensor],
        stats: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """The BNNeck heads: one branch per head (direct or per modality, then MoE) (module docstring)."""
        branches: list[dict[str, Any]] = []
        bn_feats: list[torch.Tensor] = []
        if self.direct_head is not None:
            bn, logits = self.direct_head(direct_feat)
            branches.append({"name": "fused" if fused is not None else "direct", "logits": logits,
                             "feat": direct_feat})
            bn_feats.append(bn)
        else:
            assert self.modality_heads is not None
            for name in self.modalities:
                bn, logits = self.modality_heads[name](modality_feats[name])
                branches.append({"name": name, "logits": logits, "feat": modality_feats[name]})
                bn_feats.append(bn)
        if self.moe_head is not None and moe_feat is not None:
            bn, logits = self.moe_head(moe_feat)
            branches.append({"name": "moe", "logits": logits, "feat": moe_feat})
            bn_feats.append(bn)
        return {"branches": branches, "modality_feats": modality_feats, "bn_feats": torch.cat(bn_feats, dim=-1),
                "stats": stats}

    # ------------------------------------------------------------------------------------------
    def param_groups(self, base_lr: float, weight_decay: float, backbone_lr: float | None = None,
                     rules: ParamRules = DEFAULT_RULES) -> list[dict[str, Any]]:
        """Optimizer groups: CLIP-pretrained parameters vs new modules, by :func:`modeling.param_groups.rule_groups`.

        ``backbone*`` hold the open_clip image tower (``backbone.visual.*``) at ``backbone_lr`` (``None``:
        ``base_lr``); ``new*`` everything else (SIE table, null tokens, SDTPS, HDM, ATM, DGAF, heads) at
        ``base_lr``. Under the default ``rules`` there is no decay for 1-D tensors (norm weights, gate
        scale/bias), biases, and embeddings/tokens (``positional_embedding``, ``class_embedding``,
        ``camera_embed``, ``null_tokens``, ``null_features``, HDM ``query``); ``rules`` gives DeMo's recipe
        instead. Frozen parameters (BNNeck biases) are left out; every trainable parameter is in exactly one
        group. Each group carries a ``name``.
        """
        return rule_groups(self.named_parameters(), base_lr, weight_decay, backbone_lr=backbone_lr,
                           is_backbone=lambda name: name.startswith("backbone.visual."),
                           no_decay_names=NO_DECAY_NAMES, rules=rules)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def _build(cfg: Any, use_sdtps: bool, num_classes: int | None, num_cameras: int | None) -> DeMo:
    mc = cfg.MODEL
    n_cls = int(num_classes if num_classes is not None else mc.NUM_CLASSES)
    n_cams = int(num_cameras if num_cameras is not None else mc.NUM_CAMERAS)
    if n_cls <= 0:
        raise ValueError("MODEL.NUM_CLASSES must be set to the number of training identities (got "
                         f"{n_cls}); the trainer sets it from the dataset")
    if mc.SIE_CAMERA and n_cams <= 0:
        raise ValueError(f"MODEL.SIE_CAMERA is on but MODEL.NUM_CAMERAS is {n_cams}; set it from the dataset "
                         "or turn SIE off")
    size = tuple(cfg.INPUT.SIZE_TRAIN)
    if tuple(cfg.INPUT.SIZE_TEST) != size:
        raise ValueError(f"INPUT.SIZE_TEST {tuple(cfg.INPUT.SIZE_TEST)} differs from INPUT.SIZE_TRAIN {size}; "
                         "the ViT's positional embedding is built for one patch grid")
    eval_attention, eval_fused_mlp = _eval_kernels(cfg)
    backbone = BACKBONE_REGISTRY.build(
        mc.BACKBONE or "clip_vit_b16",
        image_size=size,
        num_cameras=n_cams if mc.SIE_CAMERA else 0,
        sie_coe=mc.SIE_COE,
        sie_tokens=mc.SIE_TOKENS,
        activation=mc.CLIP_ACTIVATION,
        pretrain_path=mc.PRETRAIN_PATH,
        attention=_tower_attention(cfg),
        eval_attention=eval_attention,
        eval_fused_mlp=eval_fused_mlp,
    )
    sdtps = None
    if use_sdtps:
        s = mc.SDTPS
        sdtps = SDTPS(
            backbone.embed_dim, num_heads=s.NUM_HEADS, keep_ratio=s.KEEP_RATIO, use_gate_norm=s.USE_GATE_NORM,
            renormalize_attn=s.RENORMALIZE_ATTN, init_scale=s.GATE_INIT_SCALE, init_bias=s.GATE_INIT_BIAS,
            param_bound=s.GATE_PARAM_BOUND,
        )
    dm = mc.DEMO
    model = DeMo(
        backbone, n_cls, global_local=dm.GLOBAL_LOCAL, hdm=dm.HDM, atm=dm.ATM, atm_heads=dm.HEAD,
        direct=dm.DIRECT, hdm_dropout=dm.HDM_DROPOUT, sdtps=sdtps, dgaf=mc.DGAF.ENABLED,
    )
    logger.info(
        "built %s: backbone %s, D=%d, %d patches %s, GLOBAL_LOCAL=%s HDM=%s ATM=%s(head %d) DIRECT=%s SDTPS=%s DGAF=%s",
        mc.NAME, mc.BACKBONE or "clip_vit_b16", model.feat_dim, model.num_patches, model.patch_grid,
        dm.GLOBAL_LOCAL, dm.HDM, dm.ATM, dm.HEAD, dm.DIRECT, use_sdtps, mc.DGAF.ENABLED,
    )
    return model


@MODEL_REGISTRY.register("DeMo")
def build_demo(cfg: Any, num_classes: int | None = None, num_cameras: int | None = None) -> DeMo:
    """DeMo baseline: SDTPS always off (``MODEL.SDTPS.ENABLED`` is ignored); DGAF by ``MODEL.DGAF.ENABLED``."""
    return _build(cfg, use_sdtps=False, num_classes=num_classes, num_cameras=num_cameras)


@MODEL_REGISTRY.register("DeMo_SDTPS")
def build_demo_sdtps(cfg: Any, num_classes: int | None = None, num_cameras: int | None = None) -> DeMo:
    """DeMo with SDTPS token selection (``MODEL.SDTPS.ENABLED``, default on) and optional DGAF."""
    return _build(cfg, use_sdtps=cfg.MODEL.SDTPS.ENABLED, num_classes=num_classes, num_cameras=num_cameras)
