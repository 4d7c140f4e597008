"""Cross-entropy classification with its accuracy: the few-shot stages' criterion."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import LOSS_REGISTRY


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy, accuracy)`` of ``logits`` (N, C) against ``target`` (N,), in float32.

    Pre-training scores the training classes of a batch, meta-training the N classes of an
    episode; both minimise the mean cross-entropy. The accuracy is detached (for logging).
    """
    loss = F.cross_entropy(logits.float(), target)
    acc = (logits.detach().argmax(-1) == target).float().mean()
    return loss, acc


LOSS_REGISTRY.register("classification")(classification_loss)


class ClassificationCriterion:
    """The few-shot objective by name: ``criterion(logits, target) -> (loss, accuracy)``."""

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return classification_loss(logits, target)
