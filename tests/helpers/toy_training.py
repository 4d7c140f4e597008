"""A toy stage for trainer tests: a fixed list of batches and a least-squares objective."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ToySampler:
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epochs.append(epoch)
        self.start = start


class ToyLoader(list):
    """A fixed list of batches with the ``batch_sampler.set_epoch`` the trainer calls (``start`` skips)."""

    def __init__(self, batches: list[Any]) -> None:
        super().__init__(batches)
        self.batch_sampler = ToySampler()

    def __iter__(self):
        return iter(list.__getitem__(self, slice(self.batch_sampler.start, None)))


class Regression:
    """Least squares on ``(x, y)`` batches; ``poison`` makes the loss of those steps non-finite."""

    def __init__(self, poison: set[int] = frozenset()) -> None:
        self.poison, self.calls, self.observed = poison, 0, []

    def to_device(self, batch: Any) -> Any:
        return batch

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0])

    def loss(self, outputs: torch.Tensor, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict]:
        self.calls += 1
        loss = ((outputs - batch[1]) ** 2).mean()
        if self.calls in self.poison:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}, {"abs_out": outputs.detach().abs().mean()}

    def after_step(self, terms: dict[str, float]) -> None:
        self.observed.append(terms["mse"])

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]
