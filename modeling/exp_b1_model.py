"""ExpB1: a few-shot classifier (backbone + SAP + scaled cosine to purified prototypes), registered as ``ExpB1``.

An N-way K-shot episode runs as follows (shapes for S = N*K support and Q query images)::

    f_s, f_q   = backbone(support), backbone(query)            (S, D), (Q, D)
    protos     = class means of f_s                            (N, D)
    anchors    = SemanticAnchors(protos, class_ids)            (N, D)   text / learned / prototype
    f_s', f_q' = SAP(f_s, anchors), SAP(f_q, anchors)          purified features (residual mix)
    protos'    = class means of f_s'                           (N, D)
    logits     = metric_scale * cos(f_q', protos')             (Q, N)   MODEL.METRIC cosine (default)
               = -||f_q' - protos'||^2 / temperature                     MODEL.METRIC euclidean (ProtoNet, FEAT)

With ``MODEL.SAP.ENABLED False`` the SAP step is skipped (a cosine prototype classifier).
The pre-training head is a linear classifier over the training classes (the published
recipes pre-train, then meta-train); it is used by ``forward(images)`` without labels.

``get_parameters()`` gives SGD two groups: every trainable parameter except SAP's
``logit_scale_log`` with the default weight decay, and ``logit_scale_log`` alone with
``weight_decay`` 0.0, so decay does not pull the log-scale to 0 (the scale to 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Importing the backbone modules registers them in BACKBONE_REGISTRY.
from modeling.backbones import resnet12, timm_backbone, tiny_conv  # noqa: F401
from modeling.layers.bounded_scale import BoundedScale
from modeling.module.name_tower import name_tower_embed_dim
from modeling.module.semantic_anchor_purification import SemanticAnchorPurification
from modeling.module.semantic_anchors import SemanticAnchors, clip_embed_dim, resolve_anchor_mode
from modeling.registry import MODEL_REGISTRY, build_backbone

logger = logging.getLogger(__name__)

METRIC_SCALE_MAX = 100.0
#: ``MODEL.METRIC``: the episode head's similarity
METRICS = ("cosine", "euclidean")


class ExpB1Model(nn.Module):
    """Backbone + optional SAP + scaled-cosine prototype classifier, with a pre-training head.

    Args:
        backbone: module mapping (B, 3, H, W) -> (B, D), with attribute ``out_dim`` = D.
        num_train_classes: classes of the pre-training head.
        sap: the SAP module, or None to disable SAP.
        anchors: the anchor builder (needed when ``sap`` is given).
        metric_scale: initial scale of the episode's cosine logits.
        metric_scale_learnable: learn that scale (log-parameterised, ceiling 100).
        scale_no_decay: put SAP's ``logit_scale_log`` in a weight-decay-free group;
            False only for the ablation "learnable scale, decayed like everything else".
    """

    def __init__(self, backbone: nn.Module, num_train_classes: int, sap: SemanticAnchorPurification | None = None,
                 anchors: SemanticAnchors | None = None, metric_scale: float = 10.0,
                 metric_scale_learnable: bool = False, scale_no_decay: bool = True, metric: str = "cosine",
                 metric_temperature: float = 64.0) -> None:
        super().__init__()
        if sap is not None and anchors is None:
            raise ValueError("SAP needs an anchor builder")
        self.backbone = backbone
        self.phy_dim = int(backbone.out_dim)
        self.sap = sap
        self.anchors = anchors
        self.scale_no_decay = scale_no_decay
        self.metric_scale = BoundedScale(metric_scale, max_value=METRIC_SCALE_MAX, parameterization="log",
                                         constraint="clamp", learnable=metric_scale_learnable, name="metric_scale")
        if metric not in METRICS:
            raise ValueError(f"MODEL.METRIC must be one of {METRICS}, got {metric!r}")
        if metric_temperature <= 0:
            raise ValueError(f"MODEL.METRIC_TEMPERATURE must be > 0, got {metric_temperature}")
        self.metric, self.metric_temperature = metric, float(metric_temperature)
        self.classifier = nn.Linear(self.phy_dim, num_train_classes)

    # ------------------------------------------------------------------ forward paths
    def forward(self, images: torch.Tensor, support_labels: torch.Tensor | None = None,
                query: torch.Tensor | None = None, class_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Two uses (one ``forward`` so DDP wraps both):

        * ``forward(images)``: pre-training logits (B, num_train_classes) and ``{}``;
        * ``forward(support, support_labels, query, class_ids=None)``: episode logits (Q, N)
          and SAP stats; ``support_labels`` (S,) in ``0..N-1``, ``class_ids`` (N,) the global
          class ids of the N episode classes (for semantic anchors).
        """
        if support_labels is None:
            return self.classifier(self.backbone(images)), {}
        if query is None:
            raise ValueError("an episode needs query images")
        feats = self.backbone(torch.cat([images, query], dim=0))
        n_support = images.shape[0]
        return self.episode_logits(feats[:n_support], support_labels, feats[n_support:], class_ids)

    def episode_logits(self, support_feats: torch.Tensor, support_labels: torch.Tensor, query_feats: torch.Tensor,
                       class_ids: torch.Tensor | None = None, n_way: int | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Episode head on features: support (S, D) with labels (S,), query (Q, D) -> logits (Q, N), stats."""
        if n_way is None:
            n_way = class_ids.numel() if class_ids is not None else int(support_labels.max()) + 1
        onehot = F.one_hot(support_labels.long(), n_way).to(support_feats.dtype)  # (S, N)
        counts = onehot.sum(0).clamp_min(1.0)[:, None]
        protos = onehot.t() @ support_feats / counts  # (N, D)
        stats: dict[str, torch.Tensor] = {}
        if self.sap is not None:
            assert self.anchors is not None
            anchors = self.anchors(protos, class_ids)
            purified, stats = self.sap(torch.cat([support_feats, query_feats], dim=0), anchors)
            support_feats, query_feats = purified[: support_feats.shape[0]], purified[support_feats.shape[0]:]
            protos = onehot.t().to(support_feats.dtype) @ support_feats / counts.to(support_feats.dtype)
        if self.metric == "euclidean":  # ProtoNet's (FEAT's) head: -||q - p||^2 / temperature
            diff = query_feats.float()[:, None, :] - protos.float()[None]
            return -(diff ** 2).sum(-1) / self.metric_temperature, stats
        cos = F.normalize(query_feats.float(), dim=-1) @ F.normalize(protos.float(), dim=-1).t()
        return self.metric_scale() * cos, stats

    # ------------------------------------------------------------------ optimizer groups
    def get_parameters(self) -> list[dict[str, Any]]:
        """``[{'params': all_others}, {'params': [sap.logit_scale_log], 'weight_decay': 0.0}]``.

        Every trainable parameter appears exactly once. Without a learnable SAP scale
        (SAP disabled or ``SCALE_MODE`` fixed/constant) only the first group is returned.
        """
        scale = self.sap.logit_scale_log if self.sap is not None else None
        has_scale = isinstance(scale, nn.Parameter) and scale.requires_grad
        others = [p for p in self.parameters() if p.requires_grad and not (has_scale and p is scale)]
        groups: list[dict[str, Any]] = [{"params": others}]
        if has_scale:
            # MODEL.SAP.SCALE_NO_DECAY False (an ablation) lets the default decay act on the log-scale
            groups.append({"params": [scale], "weight_decay": 0.0} if self.scale_no_decay else {"params": [scale]})
        return groups


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local file into the backbone: a plain state dict, or a checkpoint of this repo
    (``model`` entry; its ``backbone.*`` keys are taken)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"MODEL.BACKBONE_ARGS.WEIGHTS: file not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    backbone.load_state_dict(state, strict=True)
    logger.info("backbone weights loaded from %s", file)


@MODEL_REGISTRY.register("ExpB1")
def build_exp_b1(cfg: Any) -> ExpB1Model:
    """Build :class:`ExpB1Model` from ``cfg.MODEL`` (backbone, SAP, anchors) and ``cfg.FEWSHOT``."""
    name = cfg.MODEL.BACKBONE
    if not name:
        raise ValueError("MODEL.BACKBONE is empty; ExpB1 supports resnet12, tiny_conv and timm")
    b = cfg.MODEL.BACKBONE_ARGS
    backbone = build_backbone(name, channels=tuple(b.CHANNELS), drop_rate=b.DROP_RATE, dropblock_size=b.DROPBLOCK_SIZE,
                              dropblock_ramp_steps=b.DROPBLOCK_RAMP_STEPS, timm_name=b.TIMM_NAME, weights=b.WEIGHTS)
    if b.WEIGHTS and name != "timm":
        load_backbone_weights(backbone, b.WEIGHTS)
    s = cfg.MODEL.SAP
    sap = anchors = None
    if s.ENABLED:
        sap = SemanticAnchorPurification(backbone.out_dim, logit_scale_init=s.LOGIT_SCALE_INIT,
                                         logit_scale_max=s.LOGIT_SCALE_MAX, scale_mode=s.SCALE_MODE,
                                         purify_init=s.PURIFY_INIT, projections=s.PROJECTIONS)
        mode = resolve_anchor_mode(s.ANCHOR_MODE, cfg.MODEL.CLIP_WEIGHTS, s.ANCHOR_FALLBACK, s.TEXT_TOWER)
        embed_dim = s.LEARNED_DIM
        if mode == "text":  # CLIP's text tower when its weights are given, else the name tower
            embed_dim = clip_embed_dim(s.CLIP_MODEL) if cfg.MODEL.CLIP_WEIGHTS else name_tower_embed_dim(s.TEXT_TOWER)
        anchors = SemanticAnchors(backbone.out_dim, mode, embed_dim, cfg.MODEL.NUM_CLASSES,
                                  s.ANCHOR_PROTO_WEIGHT, s.WORD_VOCAB_SIZE)
    else:
        logger.info("SAP disabled (MODEL.SAP.ENABLED False): cosine prototype classifier")
    return ExpB1Model(backbone, cfg.MODEL.NUM_CLASSES, sap, anchors, cfg.MODEL.METRIC_SCALE,
                      cfg.MODEL.METRIC_SCALE_LEARNABLE, scale_no_decay=s.SCALE_NO_DECAY, metric=cfg.MODEL.METRIC,
                      metric_temperature=cfg.MODEL.METRIC_TEMPERATURE)
