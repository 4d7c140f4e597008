"""How a few-shot batch becomes a loss: batch classification (pre-training) or an N-way K-shot episode
(meta-training), both scored by :class:`losses.classification.ClassificationCriterion`."""

from __future__ import annotations

from typing import Any

import torch

from losses.classification import ClassificationCriterion


class PretrainObjective:
    """Pre-training: batch classification over the training classes (cross-entropy, accuracy)."""

    def __init__(self, criterion: ClassificationCriterion, device: torch.device) -> None:
        self.criterion, self.device = criterion, device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["images"])

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor], epoch: float) -> tuple[torch.Tensor, dict,
                                                                                         dict[str, Any]]:
        logits, stats = outputs
        loss, acc = self.criterion(logits, batch["labels"])
        return loss, {}, {"acc": acc, **stats}

    def after_step(self, terms: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EpisodeObjective(PretrainObjective):
    """Meta-training: an N-way K-shot episode, queries classified against the support set."""

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["support"], batch["support_labels"], batch["query"], batch["class_ids"])

    def loss(self, outputs: Any, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict[str, Any]]:
        logits, stats = outputs
        loss, acc = self.criterion(logits, batch["query_labels"])
        return loss, {}, {"acc": acc, **stats}

