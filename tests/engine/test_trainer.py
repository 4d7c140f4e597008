"""The one training loop: the step, the guard, period means, evaluation, checkpoints, stages and resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.checkpoint import read_checkpoint
from engine.logger import setup_logging
from engine.monitor import NonFiniteLossError
from engine.solver import WarmupScheduler, adopt_configured_schedule
from engine.trainer import LaunchedStep, RunInterrupted, Stage, send_to_host
from tests.helpers.toy_training import Regression
from tests.helpers.toy_training import ScoreList as _Evaluator
from tests.helpers.toy_training import toy_data as _data
from tests.helpers.toy_training import toy_stage as _stage
from tests.helpers.toy_training import toy_trainer as _trainer


def test_step_matches_a_hand_written_sgd_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ref = nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    stage = _stage(model)
    x, y = stage.loader[0]
    loss, terms, grad_norm, stats = _trainer(tmp_path, model).run_step(model, stage, list(model.parameters()),
                                                                        (x, y), 0.0)
    ref_loss = ((ref(x) - y) ** 2).mean()
    ref_loss.backward()
    with torch.no_grad():
        expected_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ref.parameters()))
        for p in ref.parameters():
            p -= 0.1 * p.grad
    ref_value = float(ref_loss.detach())
    assert loss == pytest.approx(ref_value) and terms == {"mse": pytest.approx(ref_value)}
    assert grad_norm == pytest.approx(expected_norm, rel=1e-6) and "abs_out" in stats
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_a_non_finite_step_is_not_applied_and_too_many_stop_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    stage = _stage(model, objective=Regression(poison={1}))
    trainer = _trainer(tmp_path, model)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run_step(model, stage, list(model.parameters()), stage.loader[0], 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and trainer.guard.skipped == 1
    stage = _stage(model, objective=Regression(poison=set(range(1, 100))))
    with pytest.raises(NonFiniteLossError):
        _trainer(tmp_path / "stop", model, ["MONITOR.MAX_NONFINITE_STEPS", "3"]).fit(stage)


def test_fit_logs_period_means_evaluates_and_keeps_the_best(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    stage = _stage(model, epochs=3, evaluator=_Evaluator([0.2, 0.5, 0.4]))
    stage.samples_per_step = 8
    trainer = _trainer(tmp_path, model)
    setup_logging(tmp_path)
    result = trainer.fit(stage)
    trainer.metrics.close()
    assert result.best == {"score": 0.5, "epoch": 2} and result.results == {"score": 0.4}
    assert stage.loader.batch_sampler.epochs == [0, 1, 2] and trainer.run.step == 12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]  # LOG_PERIOD 2, and each epoch's last step
    observed = stage.objective.observed
    assert train[0]["train/loss/mse"] == pytest.approx((observed[0] + observed[1]) / 2)  # the period's mean
    assert [r["val/score"] for r in rows if "val/score" in r] == [0.2, 0.5, 0.4]
    best = read_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["extra"]["best"] == {"score": 0.5, "epoch": 2} and best["epoch"] == 2
    last = read_checkpoint(tmp_path / "checkpoint_epoch0003.pth")
    assert last["extra"]["run"] == {"stage": "train", "stage_epoch": 3, "global_epoch": 3, "step": 12, "epoch_step": 0}
    # each epoch's training time (4 steps of 8 samples) and each evaluation's
    timed = [r for r in rows if "train/time/epoch_s" in r]
    assert [r["step"] for r in timed] == [4, 8, 12]
    for r in timed:
        assert r["train/time/steps_per_s"] == pytest.approx(4 / r["train/time/epoch_s"])
        assert r["train/time/samples_per_s"] == pytest.approx(8 * r["train/time/steps_per_s"])
        assert 0.0 <= r["train/time/data_wait_first_s"] <= r["train/time/data_wait_s"] <= r["train/time/epoch_s"]
    assert len([r for r in rows if "val/time/eval_s" in r]) == 3
    assert re.search(r"train epoch 3: 4 steps in .* s waiting for data, .* s of it for the first batch\)",
                     (tmp_path / "log.txt").read_text())
    setup_logging(None)


class _SlowPairs(torch.utils.data.Dataset):
    """``(x, y)`` samples that take ``delay`` seconds each to load, keyed ``(index, seed)`` as SeededBatches gives."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 8

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        import time

        time.sleep(self.delay)
        g = torch.Generator().manual_seed(key[0])
        return torch.randn(3, generator=g), torch.randn(1, generator=g)


class _SlowEvaluator(_Evaluator):
    def __call__(self, model: nn.Module) -> dict[str, Any]:
        import time

        time.sleep(0.8)
        return super().__call__(model)


def test_the_loader_prepares_the_next_epoch_while_an_epoch_ends(tmp_path: Path) -> None:
    """One loader iterator spans the stage's epochs: while epoch 1 is evaluated, the workers load epoch 2's first
    batches, so epoch 2 does not wait for them (a batch takes 0.2 s to load, the evaluation 0.8 s). Epoch 1's
    first batch is waited for."""
    from datasets.samplers import SeededBatches, ShuffledBatchSampler

    sampler = SeededBatches(ShuffledBatchSampler(8, 2, shuffle=True, drop_last=True, seed=0, rank=0,
                                                 world_size=1), seed=0)
    loader = torch.utils.data.DataLoader(_SlowPairs(0.1), batch_sampler=sampler, num_workers=2,
                                         persistent_workers=True, prefetch_factor=2)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = Stage("train", loader, 2, Regression(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
                  evaluator=_SlowEvaluator([0.1, 0.2]))
    trainer = _trainer(tmp_path, model)
    trainer.fit(stage)
    trainer.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_waits = [r["train/time/data_wait_first_s"] for r in rows if "train/time/data_wait_first_s" in r]
    assert len(first_waits) == 2 and trainer.run.step == 8
    assert first_waits[0] >= 0.2 and first_waits[1] < 0.1, first_waits


def test_resume_inside_a_stage_and_after_a_finished_one(tmp_path: Path) -> None:
    def run(out: Path, resume: dict | None, second_epochs: int = 3) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))  # dropout: the RNG matters
        if resume is not None:
            model.load_state_dict(resume["model"])
        trainer = _trainer(out, model, stages=("first", "second"), resume=resume)
        for name, epochs in (("first", 2), ("second", second_epochs)):
            if trainer.pending(name, epochs):
                trainer.fit(_stage(model, name, epochs))
        trainer.metrics.close()
        return model

    straight = run(tmp_path / "straight", None)
    run(tmp_path / "killed", None, second_epochs=1)  # stops after the first epoch of the second stage
    state = read_checkpoint(tmp_path / "killed" / "checkpoint_epoch0003.pth")
    assert state["extra"]["run"] == {"stage": "second", "stage_epoch": 1, "global_epoch": 3, "step": 12,
                                     "epoch_step": 0}
    resumed = run(tmp_path / "killed", state)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # resumed from the end of the first stage: the second starts fresh, the first is not repeated
    run(tmp_path / "boundary", None, second_epochs=0)
    boundary = read_checkpoint(tmp_path / "boundary" / "checkpoint_epoch0002.pth")
    assert boundary["extra"]["run"]["stage"] == "first"
    again = run(tmp_path / "boundary", boundary)
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)


class _Interrupting(Regression):
    """Sends this process SIGINT during its ``at``-th loss, as Ctrl-C would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def loss(self, outputs: torch.Tensor, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict]:
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(outputs, batch, epoch)


def test_sigint_stops_at_the_next_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))

    straight = model()
    _trainer(tmp_path / "straight", straight, ["SOLVER.CHECKPOINT_PERIOD", "10"]).fit(_stage(straight, epochs=3))

    stopped = model()
    trainer = _trainer(tmp_path / "stopped", stopped, ["SOLVER.CHECKPOINT_PERIOD", "10"])
    with pytest.raises(RunInterrupted) as info:
        trainer.fit(_stage(stopped, epochs=3, objective=_Interrupting(at=6)))  # epoch 2, its 2nd of 4 steps
    assert info.value.signal_name == "SIGINT" and info.value.checkpoint.name == "checkpoint_interrupted.pth"
    state = read_checkpoint(info.value.checkpoint)
    assert state["extra"]["run"] == {"stage": "train", "stage_epoch": 1, "global_epoch": 1, "step": 6,
                                     "epoch_step": 2}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = model()
    resumed.load_state_dict(state["model"])
    again = _trainer(tmp_path / "stopped", resumed, ["SOLVER.CHECKPOINT_PERIOD", "10"], resume=state)
    again.fit(_stage(resumed, epochs=3))
    assert again.run.step == 12
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_resumed_run_follows_the_configs_new_schedule_from_the_restored_step() -> None:
    def build(base_lr: float, total: int, weight_decay: float) -> tuple[torch.optim.Optimizer, WarmupScheduler]:
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=base_lr, weight_decay=weight_decay)
        return opt, WarmupScheduler(opt, total_steps=total, warmup_steps=2, warmup_factor=0.01, mode="cosine")

    opt, sched = build(0.1, total=10, weight_decay=5e-4)
    for _ in range(10):  # the first run ran to its end: lr at the floor
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    opt2, sched2 = build(0.05, total=20, weight_decay=1e-3)  # resumed with twice the epochs and a new lr
    configured = sched2.state_dict(), [dict(g, params=None) for g in opt2.param_groups]
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    changes = adopt_configured_schedule(sched2, opt2, *configured)
    assert any(c.startswith("total_steps 10 -> 20") for c in changes)
    assert any(c.startswith("base_lrs [0.1] -> [0.05]") for c in changes)
    assert any("weight_decay 0.0005 -> 0.001" in c for c in changes)
    # hand-computed: cosine from the end of warm-up (step 2) to step 20, evaluated at step 10
    expected = 0.05 * 0.5 * (1 + math.cos(math.pi * (10 - 2) / (20 - 2)))
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert opt2.param_groups[0]["weight_decay"] == 1e-3
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 9 / 18)), rel=1e-12)
    # nothing changed: nothing reported, nothing touched
    opt3, sched3 = build(0.1, total=10, weight_decay=5e-4)
    configured = sched3.state_dict(), [dict(g, params=None) for g in opt3.param_groups]
    opt3.load_state_dict(saved_opt)
    sched3.load_state_dict(saved_sched)
    assert adopt_configured_schedule(sched3, opt3, *configured) == []


class _Exploding(Regression):
    """From the ``at``-th loss on, the loss is huge but finite (what a learning rate of 1e6 does)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def loss(self, outputs: torch.Tensor, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict]:
        loss, terms, stats = super().loss(outputs, batch, epoch)
        if self.calls >= self.at:
            loss = loss * 1e12
            terms = {"mse": loss.detach()}
        return loss, terms, stats


def test_blowup_steps_are_not_applied_and_the_stop_says_what_the_checkpoint_is_worth(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    over = ["MONITOR.BLOWUP_FACTOR", "10", "MONITOR.SPIKE_WARMUP", "4", "MONITOR.MAX_NONFINITE_STEPS", "3"]
    trainer = _trainer(tmp_path / "a", model, over)
    stage = _stage(model, epochs=5, objective=_Exploding(at=9))  # 4 steps an epoch: from epoch 3's first
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(stage)
    assert trainer.guard.skipped == 3 and trainer.run.step == 10  # steps 9, 10 and 11: none applied
    kept = read_checkpoint(tmp_path / "a" / "checkpoint_epoch0002.pth")["model"]
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())  # nothing applied after epoch 2
    assert "blow-up" in str(info.value) or "could not be applied" in str(info.value)
    assert "checkpoint_epoch0002.pth, holds weights in range" in str(info.value)

    # no checkpoint yet: the message says so instead of promising one
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written before this"):
        _trainer(tmp_path / "b", model, [*over, "SOLVER.CHECKPOINT_PERIOD", "10"]).fit(
            _stage(model, epochs=5, objective=_Exploding(at=6)))


def test_period_means_of_host_numbers_and_device_tensors_match_a_float64_reference() -> None:
    from engine.hooks import PeriodMeans as _PeriodMeans

    g = torch.Generator().manual_seed(0)
    steps = [{"loss": float(torch.rand(1, generator=g)), "a": torch.rand((), generator=g),
              "b": torch.rand((), generator=g, dtype=torch.float64)} for _ in range(5)]
    steps.append({"loss": 2.0, "a": torch.tensor(1.0), "c": torch.tensor(3.0)})  # a step with another key set
    period = _PeriodMeans()
    for values in steps:
        period.add(values)
    means = period.means()
    for key in ("loss", "a", "b", "c"):
        expected = sum(float(s[key]) for s in steps if key in s) / len(steps)
        assert means[key] == pytest.approx(expected, rel=1e-6), key
    assert set(means) == {"loss", "a", "b", "c"}


class _Spiking(Regression):
    """The ``at``-th loss (and only it) is huge but finite: a blow-up the guard must not apply."""

    def __init__(self, at: int, poison: set[int] = frozenset()) -> None:
        super().__init__(poison)
        self.at = at

    def loss(self, outputs: torch.Tensor, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict]:
        loss, terms, stats = super().loss(outputs, batch, epoch)
        if self.calls == self.at:
            loss = loss * 1e12
            terms = {"mse": loss.detach()}
        return loss, terms, stats


def _sgd_reference(steps: list[tuple[torch.Tensor, torch.Tensor]], skipped: set[int]) -> nn.Linear:
    """A hand-written loop: plain SGD at lr 0.1 / (1 + k) on step k, the ``skipped`` steps not applied."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    for k, (x, y) in enumerate(steps):
        loss = ((model(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        if k + 1 not in skipped:
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.1 / (1 + k) * g
    return model


@pytest.mark.parametrize("defer", [True, False])
def test_deferred_checks_apply_the_steps_a_hand_written_loop_applies(tmp_path: Path, defer: bool) -> None:
    """With MONITOR.DEFER_CHECKS the fused optimizer applies or skips each step on the device and the host
    judges it one step later; the weights, skipped steps and spike band equal the waited-for path's and a
    hand-written SGD loop with a decaying learning rate (the schedule steps after each optimizer step). The
    gradients are freed after each optimizer step, so the next forward does not hold them."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    objective = _Spiking(at=10, poison={6})
    stage = Stage("train", _data(), 4, objective, opt, sched)
    over = ["MONITOR.DEFER_CHECKS", str(defer), "MONITOR.BLOWUP_FACTOR", "10", "MONITOR.SPIKE_WARMUP", "4"]
    trainer = _trainer(tmp_path, model, over)
    assert trainer.defers(stage) is defer
    trainer.fit(stage)
    assert trainer.guard.skipped == 2 and trainer.run.step == 16
    want = _sgd_reference(stage.loader.batch_sampler.batches * 4, skipped={6, 10})
    for got, ref in zip(model.parameters(), want.parameters()):
        assert torch.allclose(got, ref, atol=1e-6)
    assert len(trainer.spikes.history) == 14 and math.isfinite(max(trainer.spikes.history))
    assert len(objective.observed) == 16
    assert all(p.grad is None for p in model.parameters())  # freed after each optimizer step (peak memory)



def test_profile_epoch_writes_a_trace_of_that_epochs_steps_with_the_loops_parts_named(tmp_path: Path) -> None:
    """MONITOR.PROFILE_EPOCH 2: a gzipped Chrome trace and an operation table of epoch 2 only, in which the
    loop's waiting for data, launching and judging of steps are named ranges; off by default."""
    import gzip

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = _trainer(tmp_path / "on", model, ["MONITOR.PROFILE_EPOCH", "2", "MONITOR.PROFILE_STEPS", "2"])
    trainer.fit(_stage(model, epochs=3))
    assert sorted(p.name for p in (tmp_path / "on" / "profile").iterdir()) == [
        "train_epoch2.ops.txt", "train_epoch2.trace.json.gz"]
    events = json.loads(gzip.decompress((tmp_path / "on" / "profile" / "train_epoch2.trace.json.gz").read_bytes()))
    names = [e.get("name") for e in events["traceEvents"]]
    assert names.count("launch step") == 2 and {"judge step", "wait for data"} <= set(names)
    assert "aten::" in (tmp_path / "on" / "profile" / "train_epoch2.ops.txt").read_text()

    model = nn.Linear(3, 1)
    _trainer(tmp_path / "off", model).fit(_stage(model, epochs=2))
    assert not (tmp_path / "off" / "profile").exists()


def test_a_step_is_judged_from_its_own_copy_on_the_host() -> None:
    """Off CUDA the values are read where they are; the judged numbers are the step's values."""
    values = torch.tensor([1.5, 2.0, 0.25])
    host, arrived = send_to_host(values)
    assert host is values and arrived is None
    assert LaunchedStep(values, ["a"], {}, on_device=False, report=host).host_values() == [1.5, 2.0, 0.25]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_judging_a_step_does_not_wait_for_the_work_queued_after_it() -> None:
    """On CUDA a step's values travel to pinned memory as soon as they exist: reading them waits for that copy,
    while the next step (here a 0.5 s sleep kernel) still runs."""
    values = torch.arange(3, dtype=torch.float32, device="cuda") * 0.5
    host, arrived = send_to_host(values)
    torch.cuda._sleep(int(0.5 * 1.9e9))  # about 0.5 s at the H200's clock
    step = LaunchedStep(values, ["a"], {}, on_device=False, report=host, arrived=arrived)
    assert host.is_pinned() and step.host_values() == [0.0, 0.5, 1.0]
    assert not torch.cuda.current_stream().query()  # the sleep kernel queued after the copy is still running
    torch.cuda.synchronize()
