"""Small reusable layers shared by both models (bounded scales, attention helpers)."""

from .attention_bias import AttentionBiasGenerator
from .bounded_scale import BoundedScale

__all__ = ["AttentionBiasGenerator", "BoundedScale"]
