"""The loop's hooks: the order the trainer calls them in, across a stop and a resume, and their checkpointed state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.checkpoint import Checkpointer, read_checkpoint
from engine.hooks import HookBase, PeriodMeans, default_hooks
from engine.trainer import RunInterrupted
from tests.helpers.toy_training import ScoreList, toy_stage, toy_trainer


class Recorder(HookBase):
    """Records every call as ``(point, epoch, steps done)``; asks for a stop after step ``stop_after``."""

    def __init__(self, calls: list[tuple[str, int, int]], stop_after: int = -1) -> None:
        self.calls, self.stop_after, self.seen = calls, stop_after, 0

    def _record(self, point: str) -> None:
        t = self.trainer
        self.calls.append((point, getattr(t, "epoch", -1) if point not in ("before_train", "after_train") else -1,
                           t.run.step))

    def before_train(self) -> None:
        self._record("before_train")

    def after_train(self) -> None:
        self._record("after_train")

    def before_epoch(self) -> None:
        self._record("before_epoch")

    def after_epoch(self) -> None:
        self._record("after_epoch")

    def before_step(self) -> None:
        self._record("before_step")

    def after_step(self) -> None:
        self._record("after_step")
        self.seen += 1
        if self.trainer.run.step == self.stop_after:
            self.trainer.stop_signal = "SIGTERM"  # what the signal handler sets

    def state_dict(self) -> dict[str, Any]:
        return {"recorder_seen": self.seen}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        self.seen = extra["recorder_seen"]
        self.calls.append(("load_state_dict", -1, self.seen))


def _epoch(epoch: int, first: int, steps: range) -> list[tuple[str, int, int]]:
    calls = [("before_epoch", epoch, first)]
    for s in steps:
        calls += [("before_step", epoch, s - 1), ("after_step", epoch, s)]
    return [*calls, ("after_epoch", epoch, steps[-1])]


def test_hooks_are_called_in_order_across_a_stop_and_a_resume(tmp_path: Path) -> None:
    """Three epochs of four steps, stopped by a signal after step 6 (inside epoch 2), then resumed: the hooks see
    the stage start, each epoch and step once, the stop, and the resumed run picking up at step 6 with the hook's
    own state restored from the checkpoint before the stage starts again."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    first: list[tuple[str, int, int]] = []
    with pytest.raises(RunInterrupted):
        toy_trainer(tmp_path, model).fit(toy_stage(model, evaluator=ScoreList([0.1, 0.2, 0.3]),
                                                   hooks=[Recorder(first, stop_after=5)]))
    # the signal hook (a default hook, before the stage's own) stops at the boundary after step 6
    assert first == [("before_train", -1, 0), *_epoch(0, 0, range(1, 5)), ("before_epoch", 1, 4),
                     ("before_step", 1, 4), ("after_step", 1, 5), ("before_step", 1, 5), ("after_train", -1, 6)]
    path = Checkpointer(tmp_path).latest()
    assert path.name == "checkpoint_interrupted.pth" and read_checkpoint(path)["extra"]["recorder_seen"] == 5

    second: list[tuple[str, int, int]] = []
    model = nn.Linear(3, 1)
    resume = read_checkpoint(path)
    Checkpointer.restore_model(resume, path, model)
    trainer = toy_trainer(tmp_path, model, resume=resume)
    trainer.fit(toy_stage(model, evaluator=ScoreList([0.2, 0.3]), hooks=[Recorder(second)]))
    steps_7_8 = [("before_epoch", 1, 6), ("before_step", 1, 6), ("after_step", 1, 7), ("before_step", 1, 7),
                 ("after_step", 1, 8), ("after_epoch", 1, 8)]
    assert second == [("load_state_dict", -1, 5), ("before_train", -1, 6), *steps_7_8, *_epoch(2, 8, range(9, 13)),
                      ("after_train", -1, 12)]


def test_a_hook_error_still_ends_the_stage() -> None:
    """``after_train`` runs when a step fails, so a hook that installed something (signal handlers, a profiler)
    removes it."""
    calls: list[str] = []

    class Failing(HookBase):
        def after_step(self) -> None:
            raise ValueError("boom")

    class Ends(HookBase):
        def after_train(self) -> None:
            calls.append("after_train")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = nn.Linear(3, 1)
        with pytest.raises(ValueError, match="boom"):
            toy_trainer(Path(tmp), model).fit(toy_stage(model, hooks=[Failing(), Ends()]))
    assert calls == ["after_train"]


def test_default_hooks_order() -> None:
    """After an epoch: profile closed, epoch timed, metrics written, evaluation (best checkpoint), compile cache,
    periodic checkpoint, then the stop check."""
    names = [type(h).__name__ for h in default_hooks()]
    assert names == ["Profiler", "EpochTimer", "MetricWriter", "BestCheckpoint", "CompileCache", "PeriodicCheckpoint",
                     "SignalStop"]


def test_period_means_against_plain_averages() -> None:
    period = PeriodMeans()
    period.add({"a": 1.0, "b": torch.tensor(2.0)})
    period.add({"a": 3.0, "b": torch.tensor(6.0)})
    assert period.means() == {"a": 2.0, "b": 4.0}
