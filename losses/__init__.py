"""Every loss and regulariser (pure functions returning (loss, stats), registered by name) and the two
families' objectives built from them (:class:`ReIDCriterion`, :class:`ClassificationCriterion`)."""

from .classification import ClassificationCriterion, classification_loss
from .conditional_entropy import GatedAttentionCEM, GMMConditionalEntropy
from .feature_norm import feature_norm_loss
from .id_loss import id_loss
from .registry import LOSS_REGISTRY, build_loss
from .reid_criterion import ReIDCriterion
from .sdm_loss import sdm_loss, sdm_multimodal
from .sdm_temperature import SDMTemperature
from .triplet_loss import triplet_loss

__all__ = [
    "LOSS_REGISTRY",
    "ClassificationCriterion",
    "ReIDCriterion",
    "classification_loss",
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
