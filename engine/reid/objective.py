"""How a ReID batch becomes a loss: the model on the batch's three modalities, then
:class:`losses.reid_criterion.ReIDCriterion` (optionally compiled with the forward as one graph)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.device import AmpPolicy
from engine.step import compile_model
from losses.reid_criterion import ReIDCriterion


def _model_stats(outputs: dict[str, Any]) -> dict[str, Any]:
    """The model's own stats of a forward, as logged (``model/<name>``)."""
    return {f"model/{k}": v for k, v in outputs.get("stats", {}).items()}


class ReIDObjective:
    """A ReID training step's loss: the model on the batch's three modalities, then the criterion."""

    def __init__(self, criterion: ReIDCriterion, device: torch.device) -> None:
        self.criterion, self.device = criterion, device

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loader's batch dict on the device (``trackids`` are not used in training and stay)."""
        dev = self.device
        return {"images": {k: x.to(dev, non_blocking=True) for k, x in batch["images"].items()},
                "pids": batch["pids"].to(dev, non_blocking=True), "camids": batch["camids"].to(dev, non_blocking=True),
                "masks": batch["masks"].to(dev, non_blocking=True)}

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return model(batch["images"], batch["camids"], batch["masks"])

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any], epoch: float) -> tuple[
            torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        total, terms = self.criterion(outputs, batch["pids"], batch["masks"], epoch)
        stats = {**_model_stats(outputs), **self.criterion.stats}
        stats["sdm_temperature"] = self.criterion.sdm_temperature.value()
        return total, terms, stats

    def compiled_step(self, mode: str, amp: AmpPolicy) -> Callable[..., tuple] | None:
        """``(model, batch, epoch) -> (total, terms, stats)`` with the forward and the loss compiled as one
        graph (``MODEL.COMPILE_SCOPE step``); ``None`` when the criterion has a term that reads the epoch
        inside (CEM). The SDM temperature enters as a device tensor, so its schedule recompiles nothing."""
        if self.criterion.cem is not None:
            return None
        criterion = self.criterion

        def forward_loss(model: torch.nn.Module, batch: dict[str, Any], temperature: torch.Tensor) -> tuple:
            with amp.autocast():
                outputs = self.forward(model, batch)
            total, terms, stats = criterion.compute(outputs, batch["pids"], batch["masks"], temperature)
            return total, terms, {**_model_stats(outputs), **stats}

        compiled = compile_model(forward_loss, mode)
        temperature = torch.zeros((), device=self.device)

        def step(model: torch.nn.Module, batch: dict[str, Any], epoch: float) -> tuple:
            tau = criterion.temperature(epoch)
            temperature.fill_(tau)
            total, terms, stats = compiled(model, batch, temperature)
            return total, terms, {**stats, "sdm_temperature": tau}

        return step

    def after_step(self, terms: dict[str, float]) -> None:
        self.criterion.observe_sdm(terms)

    def state_dict(self) -> dict[str, Any]:
        return self.criterion.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.load_state(state)

