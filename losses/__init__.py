"""Every loss and regulariser: pure functions returning (loss, stats), registered by name."""

from .conditional_entropy import GatedAttentionCEM, GMMConditionalEntropy
from .feature_norm import feature_norm_loss
from .id_loss import id_loss
from .registry import LOSS_REGISTRY, build_loss
from .sdm_loss import SDMTemperature, sdm_loss, sdm_multimodal
from .triplet_loss import triplet_loss

__all__ = [
    "LOSS_REGISTRY",
    "GMMConditionalEntropy",
    "GatedAttentionCEM",
    "SDMTemperature",
    "build_loss",
    "feature_norm_loss",
    "id_loss",
    "sdm_loss",
    "sdm_multimodal",
    "triplet_loss",
]
