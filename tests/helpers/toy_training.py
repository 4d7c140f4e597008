"""A toy stage for trainer tests: a fixed list of batches and a least-squares objective."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ToySampler:
    """Records the epochs iterated; ``batches`` is the one epoch's list of batches."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.epochs = batches, []
        self.first, self.stop, self.start = 0, 1, 0

    def set_epochs(self, first: int, stop: int, start: int = 0) -> None:
        self.first, self.stop, self.start = first, stop, start

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for epoch in range(self.first, self.stop):
            self.epochs.append(epoch)
            yield from self.batches[self.start if epoch == self.first else 0:]


class ToyLoader(list):
    """A fixed list of batches per epoch, with the ``batch_sampler.set_epochs`` the trainer calls."""

    def __init__(self, batches: list[Any]) -> None:
        super().__init__(batches)
        self.batch_sampler = ToySampler(list(batches))

    def __iter__(self):
        return iter(self.batch_sampler)


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
