"""Backbones, shared layers and the two model families (ExpB1, DeMo-SDTPS), built by name."""

from modeling.registry import BACKBONE_REGISTRY, MODEL_REGISTRY, build_backbone, build_model

__all__ = ["BACKBONE_REGISTRY", "MODEL_REGISTRY", "build_backbone", "build_model"]
