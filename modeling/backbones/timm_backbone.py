"""Any timm model as a few-shot feature extractor; weights only from a local file, never downloaded."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from modeling.registry import BACKBONE_REGISTRY

logger = logging.getLogger(__name__)


class TimmBackbone(nn.Module):
    """``timm.create_model(name, pretrained=False, num_classes=0)``: (B, 3, H, W) -> (B, out_dim).

    ``weights``: a local state-dict file (``.pth``/``.pt``/``.safetensors``; a ``state_dict`` or
    ``model`` entry is unwrapped, classifier keys are ignored). Empty: random init, logged.
    """

    def __init__(self, name: str, weights: str = "") -> None:
        super().__init__()
        import timm

        if not name:
            raise ValueError("the timm backbone needs a model name (MODEL.BACKBONE_ARGS.TIMM_NAME), e.g. resnet18")
        self.model = timm.create_model(name, pretrained=False, num_classes=0)
        self.out_dim = int(self.model.num_features)
        if weights:
            self.load_weights(weights)
        else:
            logger.info("timm backbone %s: random initialisation (no MODEL.BACKBONE_ARGS.WEIGHTS given)", name)

    def load_weights(self, path: str) -> None:
        """Load a local state dict into the timm model (non-strict for the removed classifier)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"backbone weights not found: {file}")
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        result = self.model.load_state_dict(state, strict=False)
        logger.info("timm backbone: loaded %s (missing %d keys, unexpected %d keys)",
                    file, len(result.missing_keys), len(result.unexpected_keys))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim) pooled features."""
        return self.model(x)


@BACKBONE_REGISTRY.register("timm")
def timm_backbone(timm_name: str = "", weights: str = "", **_: object) -> TimmBackbone:
    """Registered builder of :class:`TimmBackbone`."""
    return TimmBackbone(timm_name, weights)
