"""A toy stage for trainer tests: a fixed list of batches and a least-squares objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint import Checkpointer
from engine.config import load_config
from engine.device import build_amp_policy
from engine.logger import MetricsLogger
from engine.trainer import Stage, Trainer


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


DEVICE = torch.device("cpu")


class ScoreList:
    """An evaluator that returns the next of ``scores`` each time."""

    prefix = "val"

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        return {"score": self.scores.pop(0)}

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        return {"score": results["score"]}

    def score(self, results: dict[str, Any]) -> float:
        return results["score"]

    def lines(self, results: dict[str, Any]) -> list[str]:
        return [f"score {results['score']}"]


def toy_data(n: int = 4) -> ToyLoader:
    g = torch.Generator().manual_seed(0)
    return ToyLoader([(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)])


def toy_stage(model: nn.Module, name: str = "train", epochs: int = 3, objective: Any = None,
           evaluator: Any = None, hooks: list | None = None) -> Stage:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return Stage(name, toy_data(), epochs, objective or Regression(), opt, sched, evaluator=evaluator,
                 hooks=list(hooks or []))


def toy_trainer(tmp: Path, model: nn.Module, overrides: list[str] = (), stages=("train",), resume=None) -> Trainer:
    cfg = load_config(None, ["SOLVER.LOG_PERIOD", "2", "SOLVER.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1",
                             "SOLVER.GRAD_CLIP", "0.0", *overrides])
    return Trainer(cfg, model, DEVICE, build_amp_policy("fp32", DEVICE), Checkpointer(tmp),
                   MetricsLogger(tmp, "disabled"), stages=stages, resume=resume)
