"""Backbones, shared layers and the two model families (ExpB1, DeMo-SDTPS), built by name."""

import modeling.demo  # noqa: F401  (registers DeMo, DeMo_SDTPS and the CLIP ViT backbones)
from modeling import exp_b1_model  # noqa: F401  (registers ExpB1)
from modeling.registry import BACKBONE_REGISTRY, MODEL_REGISTRY, build_backbone, build_model

__all__ = ["BACKBONE_REGISTRY", "MODEL_REGISTRY", "build_backbone", "build_model"]
