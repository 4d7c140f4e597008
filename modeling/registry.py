"""Registries for models (built from a config) and backbones (built from keyword arguments)."""

from __future__ import annotations

from typing import Any

from torch import nn

from utils.registry import Registry

MODEL_REGISTRY = Registry("model")
BACKBONE_REGISTRY = Registry("backbone")


def build_model(cfg: Any) -> nn.Module:
    """Build the model ``cfg.MODEL.NAME`` names (``ExpB1``, ``DeMo``, ``DeMo_SDTPS``)."""
    if not cfg.MODEL.NAME:
        raise ValueError("MODEL.NAME is empty; set it in the config file (ExpB1, DeMo or DeMo_SDTPS)")
    return MODEL_REGISTRY.get(cfg.MODEL.NAME)(cfg)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name."""
    return BACKBONE_REGISTRY.build(name, **kwargs)
