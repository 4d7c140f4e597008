"""The one training loop of both model families.

A run is a sequence of stages (ReID: ``train``; few-shot: ``pretrain`` then ``meta``). A :class:`Stage` says
only what differs between families: its loader, how a batch becomes a loss (an :class:`Objective`), how to
evaluate (an :class:`Evaluator`), its optimizer and schedule, and any hooks of its own. :meth:`Trainer.fit`
runs it top to bottom: per epoch, per step, the step of :class:`engine.step.StepRunner` (judged on the host one
step later where the device can decide) and the schedule; everything periodic (evaluation and the best
checkpoint, periodic checkpoints, metrics, epoch timing, profiling, the compile cache, the stop on a signal) is
a hook of :mod:`engine.hooks`.

One loader iterator runs through all of a stage's epochs, so the next epoch's first batches are loaded while an
epoch ends. Everything a resumed run needs is in the checkpoint: model, optimizer, scheduler, scaler, the
objective's state, the monitors, the hooks' state (the best score) and the run's counters (:class:`RunState`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.checkpoint import Checkpointer, checkpoint_meta, unwrap
from engine.data_wait import DataWait
from engine.device import AmpPolicy
from engine.hooks import BestCheckpoint, HookBase, default_hooks
from engine.launch import wrap_ddp
from engine.logger import MetricsLogger, progress
from engine.prefetch import DevicePrefetcher
from engine.seed import set_rng_state
from engine.solver import adopt_configured_schedule
from engine.step import LaunchedStep, StepRunner, compile_model, send_to_host
from utils.distributed import any_rank, barrier, is_dist

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "LaunchedStep", "Objective", "RunInterrupted", "RunState", "Stage", "StageResult", "Trainer",
           "compile_model", "epoch_steps", "epochs_done", "run_state_of", "send_to_host"]


@dataclass
class RunState:
    """Counters across the stages of a run: the stage being trained, its completed epochs, and the
    run's completed epochs and optimizer steps."""

    stage: str | None = None
    stage_epoch: int = 0
    global_epoch: int = 0
    step: int = 0
    epoch_step: int = 0  # steps done in the current, unfinished epoch (a run stopped mid-epoch)


class RunInterrupted(Exception):
    """A stop signal (SIGINT, SIGTERM, SIGUSR1) stopped the run at a step boundary, after writing
    ``checkpoint``."""

    def __init__(self, signal_name: str, checkpoint: Path | None, run: RunState) -> None:
        super().__init__(f"{signal_name} at epoch {run.global_epoch + 1}, step {run.step}")
        self.signal_name, self.checkpoint, self.run = signal_name, checkpoint, run


class Objective(Protocol):
    """How a batch becomes a loss: the part of a training step that differs between families.

    An objective may also offer ``compiled_step(mode, amp)``: a ``(model, batch, epoch) -> (total, terms,
    stats)`` callable with the forward and the loss compiled as one graph, or ``None`` where it cannot
    (``MODEL.COMPILE_SCOPE step``; :meth:`Trainer.compile_stage`).
    """

    def to_device(self, batch: Any) -> Any:
        """The loader's batch on the training device."""

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """Run ``model`` on a device batch (called under autocast)."""

    def loss(self, outputs: Any, batch: Any, epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                    dict[str, Any]]:
        """``(total, terms, stats)``: the fp32 scalar to minimise, its weighted parts (detached 0-d
        tensors, logged as ``loss/<name>``; may be empty) and other values to log (period means)."""

    def after_step(self, terms: dict[str, float]) -> None:
        """React to the step's host values of the terms (e.g. a non-finite SDM term)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run must restore (schedules, own parameters)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Evaluator(Protocol):
    """How a stage is evaluated: results by name, what of them is logged, and the score to keep the best of."""

    prefix: str

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        """Evaluate ``model`` (the unwrapped module) and return the results."""

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        """The numbers to log (under :attr:`prefix`)."""

    def score(self, results: dict[str, Any]) -> float:
        """Higher is better; the best-scoring weights are kept."""

    def lines(self, results: dict[str, Any]) -> list[str]:
        """Human-readable summary lines for the log."""


def epoch_steps(batch_sampler: Any, epoch: int) -> int:
    """Steps of training ``epoch``: the sampler's ``batches_in_epoch(epoch)`` where it has one (an epoch
    length that varies with the draw), else its ``batches_per_epoch``."""
    per_epoch = getattr(batch_sampler, "batches_in_epoch", None)
    return per_epoch(epoch) if per_epoch is not None else batch_sampler.batches_per_epoch


@dataclass
class Stage:
    """One stage of a run: what to train with and for how long."""

    name: str
    #: a DataLoader whose batch sampler has ``set_epochs(first, stop, start)`` and ``batches_per_epoch``
    #: (:class:`datasets.samplers.SeededBatches`)
    loader: Any
    epochs: int
    objective: Objective
    optimizer: torch.optim.Optimizer
    #: ``step()`` after every optimizer step (a torch ``LRScheduler``); one with ``begin_epoch(epoch)`` is also
    #: called before each epoch's first step (:mod:`engine.solver`)
    scheduler: Any
    evaluator: Evaluator | None = None
    log_prefix: str = "train"
    find_unused_parameters: bool = False
    describe: Callable[[], str] = field(default=lambda: "")
    #: samples in one batch of one process (for the samples/s of the epoch timing; 0: not reported)
    samples_per_step: int = 0

    #: the stage's own hooks, run after :func:`engine.hooks.default_hooks`
    hooks: list[HookBase] = field(default_factory=list)


@dataclass
class StageResult:
    """What :meth:`Trainer.fit` returns: the last evaluation's results (``None`` when the stage evaluated
    nothing on this rank) and the best score."""

    results: dict[str, Any] | None
    best: dict[str, Any]



class Trainer(StepRunner):
    """Runs stages of one model with one checkpointer, metrics logger and AMP policy.

    Args:
        cfg: the frozen config (``SOLVER`` periods and clipping, ``MONITOR``, ``MODEL.COMPILE``).
        model: the model (not wrapped); DDP and ``torch.compile`` wrap it per stage.
        device, amp: where and in which precision to train.
        ckpt, metrics: the run folder's checkpointer and metrics logger (``None`` for :meth:`run_step` alone,
            as a benchmark uses it).
        stages: the names of the run's stages, in order.
        resume: a checkpoint read with :func:`engine.checkpoint.read_checkpoint` (``None``: fresh run);
            its model weights are expected to be loaded already.
    """

    def __init__(self, cfg: Any, model: torch.nn.Module, device: torch.device, amp: AmpPolicy,
                 ckpt: Checkpointer | None, metrics: MetricsLogger | None, stages: tuple[str, ...],
                 resume: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, amp)
        self.model, self.device, self.ckpt, self.metrics, self.stages = model, device, ckpt, metrics, tuple(stages)
        self.resume = resume
        self.run = RunState(**run_state_of(resume)) if resume is not None else RunState()
        self.stop_signal: str | None = None
        self.compiled_eval: torch.nn.Module | None = None
        self.hooks: list[HookBase] = []
        self.pending_step: LaunchedStep | None = None  # the step the host judges while the device runs the next
        self.saved_this_epoch = False

    def pending(self, name: str, epochs: int) -> bool:
        """Whether stage ``name`` of ``epochs`` epochs has epochs left to train (after a resume, maybe none)."""
        run = self.run
        if run.stage is not None and self.stages.index(run.stage) > self.stages.index(name):
            return False  # finished before the checkpoint the run resumed from
        done = epochs_done(run, self.stages, name, epochs)
        if epochs <= 0 or done >= epochs:
            logger.info("stage %s: nothing to do (%d of %d epochs done)", name, done, epochs)
            return False
        return True

    def fit(self, stage: Stage) -> StageResult:
        """Train ``stage`` (or finish it after a resume); returns the last evaluation and the best score."""
        if not self.pending(stage.name, stage.epochs):
            return StageResult(None, BestCheckpoint().best)
        model, params = self._begin(stage)
        self._call("before_train")
        try:
            for epoch in range(self.start_epoch, stage.epochs):
                self.epoch = epoch
                self._train_epoch(model, stage, params)
                self._call("after_epoch")
        finally:
            self._call("after_train")
        if self.ckpt is not None:
            self.ckpt.wait()  # the stage's checkpoints are on disk before anything marks it done
        evaluation = next(h for h in self.hooks if isinstance(h, BestCheckpoint))
        return StageResult(evaluation.results, evaluation.best)

    def _begin(self, stage: Stage) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """Set up a stage: its hooks and monitors, a resumed stage's state, the DDP / compiled model, the loader's
        epochs; returns the model to train and the parameters to clip (every group's)."""
        run = self.run
        self.stage, self.hooks = stage, [*default_hooks(), *stage.hooks]
        for hook in self.hooks:
            hook.trainer = self
        self.start_epoch = run.stage_epoch if run.stage == stage.name else 0
        self.spikes, self.guard = self.new_monitors()
        if run.stage == stage.name and (self.start_epoch > 0 or run.epoch_step > 0):  # resumed inside this stage
            self._restore(stage)
        if self.resume is not None:  # the random state the run had when the checkpoint was written
            if self.resume.get("rng") is not None:
                set_rng_state(self.resume["rng"])
            self.resume = None
        params = [p for g in stage.optimizer.param_groups for p in g["params"]]
        model = self.compile_stage(stage, wrap_ddp(self.model, self.device,
                                                   find_unused_parameters=stage.find_unused_parameters))
        run.stage, run.stage_epoch = stage.name, self.start_epoch  # a stop mid-epoch saves this stage's count
        sampler = stage.loader.batch_sampler
        steps = epoch_steps(sampler, self.start_epoch)
        logger.info("stage %s: epochs %d..%d of %d steps%s%s", stage.name, self.start_epoch + 1, stage.epochs, steps,
                    "" if steps == epoch_steps(sampler, stage.epochs - 1) else " (varying by epoch)", stage.describe())
        # resumed mid-epoch, the loader starts with the batches not yet trained on, augmented as they would have been
        sampler.set_epochs(self.start_epoch, stage.epochs, start=run.epoch_step)
        self.stream = iter(stage.loader)
        return model, params

    def _train_epoch(self, model: torch.nn.Module, stage: Stage, params: list[torch.nn.Parameter]) -> None:
        """One epoch's steps: launch, judge the step before, move the schedule and counters, call the hooks."""
        run = self.run
        self.epoch_skip = run.epoch_step if self.epoch == self.start_epoch else 0
        self.steps = steps = epoch_steps(stage.loader.batch_sampler, self.epoch)
        if hasattr(stage.scheduler, "begin_epoch"):  # a per-epoch schedule sets this epoch's rates
            stage.scheduler.begin_epoch(self.epoch)
        model.train()
        self.fed = DataWait(itertools.islice(self.stream, steps - self.epoch_skip))
        on_device = DevicePrefetcher(self.fed, stage.objective.to_device, self.device,
                                     enabled=self.cfg.DATALOADER.PREFETCH_TO_DEVICE)
        batches = progress(on_device, desc=f"{stage.name} {self.epoch + 1}/{stage.epochs}", total=steps - self.epoch_skip)
        self.saved_this_epoch = False
        self._call("before_epoch")
        for iteration, batch in enumerate(batches, start=self.epoch_skip):
            self.iteration = iteration
            self._call("before_step")
            self.last_step, self.pending_step = self.advance(model, stage, params, batch,
                                                             self.epoch + self.iteration / steps, self.pending_step)
            stage.scheduler.step()  # after the step's optimizer step, wherever that ran
            run.step, run.epoch_step = run.step + 1, self.iteration + 1
            self._call("after_step")
        self.judge_pending()
        run.stage_epoch, run.global_epoch, run.epoch_step = self.epoch + 1, run.global_epoch + 1, 0

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    def judge_pending(self) -> None:
        """Judge the step still waiting for the host (if any)."""
        self._judge(self.stage, self.pending_step)
        self.pending_step = None

    # ------------------------------------------------------------------------------------------
    def stop_requested(self, sync: bool) -> bool:
        """Whether to stop here. One process: when it was signalled. Under DDP: when any rank was, decided
        only at ``sync`` points (every SOLVER.LOG_PERIOD steps and at epoch ends, one all-reduce), so that
        every rank stops at the same step."""
        if not is_dist():
            return self.stop_signal is not None
        if not sync:
            return False
        agreed = any_rank(self.stop_signal is not None)
        if agreed and self.stop_signal is None:
            self.stop_signal = "a signal to another rank"
        return agreed

    def stop(self, saved: Path | None = None) -> None:
        """Write the resumable state at this step boundary (unless just written) and raise :class:`RunInterrupted`."""
        path = saved
        if path is None and self.ckpt is not None:
            path = self.save_checkpoint("interrupted", periodic=False)
        if self.ckpt is not None:
            self.ckpt.wait()
        barrier()
        raise RunInterrupted(self.stop_signal or "stop", path, self.run)

    def save_checkpoint(self, tag: str, periodic: bool = True) -> Path:
        """The stage's resumable state as ``checkpoint_<tag>.pth``."""
        stage, run = self.stage, self.run
        extra = {"run": self.run_record(), "spikes": self.spikes.state_dict(), "guard": self.guard.state_dict(),
                 "objective": stage.objective.state_dict(), "meta": self.meta()}
        for hook in self.hooks:
            extra.update(hook.state_dict())
        return self.ckpt.save(tag, model=self.model, optimizer=stage.optimizer, scheduler=stage.scheduler,
                              scaler=self.amp.scaler, epoch=run.global_epoch, step=run.step, extra=extra,
                              periodic=periodic)

    def run_record(self) -> dict[str, Any]:
        """The run's counters as a checkpoint keeps them."""
        return asdict(self.run)

    def meta(self) -> dict[str, Any]:
        """Where a checkpoint comes from (:func:`engine.checkpoint.checkpoint_meta`)."""
        return checkpoint_meta(self.cfg)

    def _restore(self, stage: Stage) -> None:
        """Restore the stage's optimizer, schedule, scaler, monitors, objective and hooks from the resume checkpoint."""
        state = self.resume
        assert state is not None
        configured = stage.scheduler.state_dict(), [dict(g, params=None) for g in stage.optimizer.param_groups]
        stage.optimizer.load_state_dict(state["optimizer"])
        stage.scheduler.load_state_dict(state["scheduler"])
        changes = adopt_configured_schedule(stage.scheduler, stage.optimizer, *configured)
        if changes:
            logger.warning("the config's schedule differs from the checkpoint's (%s): continuing with the config's "
                           "from step %d (lr now %.3g)", "; ".join(changes), self.run.step,
                           stage.optimizer.param_groups[0]["lr"])
        if state.get("scaler") is not None and self.amp.scaler.is_enabled():
            self.amp.scaler.load_state_dict(state["scaler"])
        extra = state["extra"]
        self.spikes.load_state_dict(extra["spikes"])
        self.guard.load_state_dict(extra["guard"])
        if extra.get("objective") is not None:
            stage.objective.load_state_dict(extra["objective"])
        for hook in self.hooks:
            hook.load_state_dict(extra)
        where = f"epoch {self.run.stage_epoch}" + (f" and {self.run.epoch_step} steps" if self.run.epoch_step else "")
        logger.info("resuming stage %s after %s (step %d)", stage.name, where, self.run.step)
        if self.ckpt is not None:
            periodic = sorted(p.name for p in self.ckpt.save_dir.glob("checkpoint_epoch*.pth"))
            if len(periodic) >= self.ckpt.keep:
                logger.warning("this run keeps its newest %d periodic checkpoints: %s will be deleted as new ones "
                               "are written (copy them elsewhere to keep them)", self.ckpt.keep, ", ".join(periodic))

    def eval_model(self) -> torch.nn.Module:
        """The model evaluation runs: the bare module, compiled (once per run) under ``MODEL.COMPILE``."""
        model = unwrap(self.model)
        if not self.cfg.MODEL.COMPILE:
            return model
        if self.compiled_eval is None:
            self.compiled_eval = compile_model(model, self.cfg.MODEL.COMPILE)
        return self.compiled_eval


def epochs_done(run: RunState, stages: Sequence[str], name: str, epochs: int) -> int:
    """Epochs of stage ``name`` (of ``epochs``) trained by a run at ``run``: all of them once a later one of
    ``stages`` has started."""
    if run.stage in stages and stages.index(run.stage) > stages.index(name):
        return epochs
    return run.stage_epoch if run.stage == name else 0


def run_state_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The :class:`RunState` fields a checkpoint was written at."""
    extra = checkpoint.get("extra", {})
    if "run" in extra:
        return dict(extra["run"])
    # a ReID checkpoint written before runs had stages: one stage, "train"
    return {"stage": "train", "stage_epoch": int(checkpoint["epoch"]), "global_epoch": int(checkpoint["epoch"]),
            "step": int(checkpoint["step"])}
