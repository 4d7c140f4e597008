"""The one training loop of both model families.

A run is a sequence of stages (ReID: ``train``; few-shot: ``pretrain`` then ``meta``). A
:class:`Stage` says only what differs between families: its loader, how a batch becomes a
loss (an :class:`Objective`), how to evaluate (an :class:`Evaluator`), and its optimizer and
schedule. :class:`Trainer` runs it top to bottom:

* per step (:meth:`Trainer.launch_step` then :meth:`Trainer.settle`, the only copy of the
  optimisation step; on a GPU the next batch is already being copied,
  :class:`engine.prefetch.DevicePrefetcher`): forward under autocast -> loss in fp32 -> backward
  through the grad scaler -> unscale -> clip (``SOLVER.GRAD_CLIP``) -> the step is applied unless a
  value is non-finite or a blow-up (:class:`NonFiniteGuard`) -> spike detector -> schedule. With
  ``MONITOR.DEFER_CHECKS`` and a fused optimizer the device applies or skips the step itself and the
  host reads the step's values (one transfer) while the next step runs; otherwise the host waits for
  them before the optimizer step. Every ``SOLVER.LOG_PERIOD`` steps and at the end of an epoch the
  period's means are logged;
* per stage: one loader iterator runs through all its epochs, so the next epoch's first batches are
  loaded while an epoch ends;
* per epoch: evaluation every ``SOLVER.EVAL_PERIOD`` epochs and at the last one (rank 0; the
  best score's weights are kept as ``checkpoint_best.pth``), then a checkpoint every
  ``SOLVER.CHECKPOINT_PERIOD`` epochs and at the last one.

Everything a resumed run needs is in the checkpoint: model, optimizer, scheduler, scaler,
the objective's state, the monitors, the best score and the run's counters (:class:`RunState`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from datasets.loader import STOP_SIGNALS
from engine import compile_cache
from engine.checkpoint import Checkpointer, checkpoint_meta, read_checkpoint, unwrap
from engine.data_wait import DataWait
from engine.device import AmpPolicy
from engine.launch import wrap_ddp
from engine.logger import MetricsLogger, progress
from engine.monitor import NonFiniteGuard, NonFiniteLossError, SpikeDetector
from engine.prefetch import DevicePrefetcher
from engine.profiling import epoch_profiler
from engine.seed import set_rng_state
from engine.solver import adopt_configured_schedule
from utils.distributed import any_rank, barrier, get_world_size, is_dist, is_main_process

logger = logging.getLogger(__name__)

#: a weight larger than this (in absolute value) means the model has blown up
WEIGHT_RANGE = 1e4


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


@dataclass
class StageResult:
    """What :meth:`Trainer.fit` returns: the last evaluation's results (``None`` when the stage evaluated
    nothing on this rank) and the best score."""

    results: dict[str, Any] | None
    best: dict[str, Any]


@dataclass
class LaunchedStep:
    """A training step queued on the device and not yet judged on the host (:meth:`Trainer.settle`)."""

    #: loss, gradient norm and the loss terms (float32, on the device)
    values: torch.Tensor
    #: the loss terms' names, in ``values[2:]``
    names: list[str]
    #: the objective's statistics of the step
    stats: dict[str, Any]
    #: whether the optimizer already ran on the device (applying or skipping the step)
    on_device: bool
    #: ``values`` (then the device's blow-up verdict, when ``on_device``) on their way to the host, and the
    #: event that marks them arrived (``None`` off CUDA): judging waits for this step, not for the next one
    report: torch.Tensor | None = None
    arrived: torch.cuda.Event | None = None

    def host_values(self) -> list[float]:
        """``values`` (then the verdict) as host floats, waiting for this step's copy only."""
        if self.arrived is not None:
            self.arrived.synchronize()
        return (self.report if self.report is not None else self.values).tolist()


def send_to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``values`` to pinned host memory; returns the copy and the event marking it done (on CUDA),
    else ``values`` itself and ``None``. Reading a device tensor later (``tolist``) would wait for all the work
    queued after it too."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record()
    return host, arrived


class Trainer:
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
        self.cfg, self.model, self.device, self.amp = cfg, model, device, amp
        self.ckpt, self.metrics, self.stages = ckpt, metrics, tuple(stages)
        self.resume = resume
        self.run = RunState(**run_state_of(resume)) if resume is not None else RunState()
        m = cfg.MONITOR
        self._monitor_args = (m.SPIKE_WINDOW, m.SPIKE_WARMUP, m.SPIKE_MAD_FLOOR, m.SPIKE_REL_FLOOR, m.SPIKE_SIGMAS)
        self._max_nonfinite = m.MAX_NONFINITE_STEPS
        self.spikes = SpikeDetector(*self._monitor_args)
        self.guard = NonFiniteGuard(self._max_nonfinite)
        self._stop_signal: str | None = None
        self._compiled_eval: torch.nn.Module | None = None
        #: the objective's compiled forward + loss (``MODEL.COMPILE_SCOPE step``), set by :meth:`compile_stage`
        self.compiled_step: Callable[..., tuple] | None = None

    # ------------------------------------------------------------------------------------------
    def compile_stage(self, stage: Stage, model: torch.nn.Module) -> torch.nn.Module:
        """The model :meth:`run_step` trains under ``MODEL.COMPILE``: compiled (``MODEL.COMPILE_SCOPE model``),
        or as given when the objective compiles its forward and loss as one graph (``step``; then
        :attr:`compiled_step` is set). Without ``MODEL.COMPILE``, ``model`` itself."""
        self.compiled_step = None
        mode = self.cfg.MODEL.COMPILE
        if not mode:
            return model
        if self.cfg.MODEL.COMPILE_SCOPE == "step":
            make = getattr(stage.objective, "compiled_step", None)
            self.compiled_step = make(mode, self.amp) if make is not None else None
            if self.compiled_step is not None:
                return model
            logger.info("MODEL.COMPILE_SCOPE step: the %s stage's objective cannot be compiled as one graph; "
                        "compiling the model alone", stage.name)
        return compile_model(model, mode)

    def run_step(self, model: torch.nn.Module, stage: Stage, params: list[torch.nn.Parameter], batch: Any,
                 epoch: float) -> tuple[float, dict[str, float], float, dict[str, Any]]:
        """One optimisation step, judged at once; returns ``(loss, terms, grad_norm, stats)`` with host floats
        for the first three."""
        return self.settle(stage, self.launch_step(model, stage, params, batch, epoch))

    def launch_step(self, model: torch.nn.Module, stage: Stage, params: list[torch.nn.Parameter], batch: Any,
                    epoch: float) -> LaunchedStep:
        """Queue one optimisation step on the device; :meth:`settle` judges it on the host later.

        Where the step can be applied or skipped on the device (:meth:`defers`), the optimizer runs here,
        skipping the step by the guard's rule (a non-finite loss term or gradient norm, or a blow-up against
        the spike band as it stands now); otherwise :meth:`settle` waits for the step and decides.
        """
        obj, optimizer, scaler = stage.objective, stage.optimizer, self.amp.scaler
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (MODEL.COMPILE reduce-overhead)
        if self.compiled_step is not None:  # MODEL.COMPILE_SCOPE step: forward and loss in one compiled graph
            loss, terms, stats = self.compiled_step(model, batch, epoch)
        else:
            with self.amp.autocast():
                outputs = obj.forward(model, batch)
            loss, terms, stats = obj.loss(outputs, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip = self.cfg.SOLVER.GRAD_CLIP
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        # the step's values in one tensor (a copy: CUDA graph outputs are overwritten by the next step)
        values = torch.stack([loss.detach().float(), grad_norm.float(), *(t.float() for t in terms.values())])
        step = LaunchedStep(values, list(terms), stats, on_device=self.defers(stage))
        if not step.on_device:
            step.report, step.arrived = send_to_host(values)
        else:
            judged = values[2:] if terms else values[:1]  # what the guard judges: the terms, or the loss alone
            threshold = self.spikes.blowup_threshold(self.cfg.MONITOR.BLOWUP_FACTOR)
            blowup = torch.isfinite(values[0]) & (values[0] > threshold)
            skip = ~torch.isfinite(judged).all() | ~torch.isfinite(values[1]) | blowup
            step.report, step.arrived = send_to_host(torch.cat([values, blowup.float()[None]]))
            optimizer.found_inf, optimizer.grad_scale = skip.float(), None  # the fused optimizer's skip switch
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
            optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free for the next forward
        return step

    def defers(self, stage: Stage) -> bool:
        """Whether the stage's steps are applied or skipped on the device and judged one step later on the host
        (``MONITOR.DEFER_CHECKS``, a fused optimizer, no fp16 loss scaling)."""
        return (self.cfg.MONITOR.DEFER_CHECKS and bool(stage.optimizer.defaults.get("fused"))
                and not self.amp.scaler.is_enabled())

    def settle(self, stage: Stage, step: LaunchedStep) -> tuple[float, dict[str, float], float, dict[str, Any]]:
        """Judge a launched step on the host (waiting for it): count a non-finite or blown-up step (and stop the run
        after too many), apply it unless the device already did, feed the spike band; returns
        ``(loss, terms, grad_norm, stats)`` with host floats for the first three."""
        obj, optimizer, scaler = stage.objective, stage.optimizer, self.amp.scaler
        host = step.host_values()  # the values, then the device's blow-up verdict if it judged
        loss, grad_norm = host[0], host[1]
        term_values = dict(zip(step.names, host[2:2 + len(step.names)]))
        factor = self.cfg.MONITOR.BLOWUP_FACTOR
        blown = bool(host[-1]) if step.on_device else math.isfinite(loss) and self.spikes.is_blowup(loss, factor)
        blowup = [f"loss {loss:.4g} (over {factor:g} spike bands above the median: a blow-up)"] if blown else []
        applied = self.guard.check(term_values or {"loss": loss}, None if scaler.is_enabled() else grad_norm, blowup)
        if not step.on_device:
            if applied:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free for the next forward
        if applied:
            self.spikes.update(loss)
        obj.after_step(term_values)
        return loss, term_values, grad_norm, step.stats

    def advance(self, model: torch.nn.Module, stage: Stage, params: list[torch.nn.Parameter], batch: Any,
                epoch: float, pending: LaunchedStep | None) -> tuple[LaunchedStep, LaunchedStep | None]:
        """Launch a step, then judge ``pending``, the step before it (the device has run it, or nearly); a step
        whose optimizer waits for the host's verdict is judged at once. Returns the step and what is left to
        judge (the step itself where the device decided, else None)."""
        with torch.profiler.record_function("launch step"):  # named ranges in a MONITOR.PROFILE_EPOCH trace
            step = self.launch_step(model, stage, params, batch, epoch)
        with torch.profiler.record_function("judge step"):
            self._judge(stage, pending)
            if step.on_device:
                return step, step
            self._judge(stage, step)
        return step, None

    def _judge(self, stage: Stage, step: LaunchedStep | None) -> None:
        """:meth:`settle` ``step`` (if any) inside :meth:`fit`, saying what the last checkpoint is worth if the run
        must stop."""
        if step is None:
            return
        try:
            self.settle(stage, step)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err} {self._checkpoint_report()}") from None

    # ------------------------------------------------------------------------------------------
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
        run = self.run
        start_epoch = run.stage_epoch if run.stage == stage.name else 0
        best: dict[str, Any] = {"score": -math.inf, "epoch": -1}
        if not self.pending(stage.name, stage.epochs):
            return StageResult(None, best)
        self.spikes = SpikeDetector(*self._monitor_args)
        self.guard = NonFiniteGuard(self._max_nonfinite)
        if run.stage == stage.name and (start_epoch > 0 or run.epoch_step > 0):  # resumed inside this stage
            best = self._restore(stage)
        if self.resume is not None:  # the random state the run had when the checkpoint was written
            if self.resume.get("rng") is not None:
                set_rng_state(self.resume["rng"])
            self.resume = None
        params = [p for g in stage.optimizer.param_groups for p in g["params"]]  # clip over every group
        train_model = wrap_ddp(self.model, self.device, find_unused_parameters=stage.find_unused_parameters)
        cache = compile_cache.cache_path(self.cfg, self.device, stage.name) if is_main_process() else None
        if self.cfg.MODEL.COMPILE:
            compile_cache.load(cache)
        train_model = self.compile_stage(stage, train_model)
        run.stage, run.stage_epoch = stage.name, start_epoch  # a stop mid-epoch saves this stage's count
        sampler = stage.loader.batch_sampler
        steps = epoch_steps(sampler, start_epoch)
        logger.info("stage %s: epochs %d..%d of %d steps%s%s", stage.name, start_epoch + 1, stage.epochs, steps,
                    "" if steps == epoch_steps(sampler, stage.epochs - 1) else " (varying by epoch)", stage.describe())
        s = self.cfg.SOLVER
        last_results: dict[str, Any] | None = None
        # one loader iterator over the stage's epochs: the workers prepare an epoch's first batches while the
        # epoch before it ends; resumed mid-epoch, it starts with the batches not yet trained on, augmented as
        # they would have been
        sampler.set_epochs(start_epoch, stage.epochs, start=run.epoch_step)
        stream = iter(stage.loader)
        with self._stop_on_signals():
            for epoch in range(start_epoch, stage.epochs):
                skip = run.epoch_step if epoch == start_epoch else 0
                steps = epoch_steps(sampler, epoch)
                if hasattr(stage.scheduler, "begin_epoch"):  # a per-epoch schedule sets this epoch's rates
                    stage.scheduler.begin_epoch(epoch)
                train_model.train()
                period = _PeriodMeans()
                fed = DataWait(itertools.islice(stream, steps - skip))
                on_device = DevicePrefetcher(fed, stage.objective.to_device, self.device,
                                             enabled=self.cfg.DATALOADER.PREFETCH_TO_DEVICE)
                batches = progress(on_device, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", total=steps - skip)
                started = time.perf_counter()
                pending: LaunchedStep | None = None  # the step the host judges while the device runs the next
                profiled = epoch_profiler(epoch, self.cfg.MONITOR.PROFILE_EPOCH if is_main_process() else 0,
                                          self.cfg.MONITOR.PROFILE_STEPS, self.ckpt.save_dir / "profile",
                                          f"{stage.name}_epoch{epoch + 1}", self.device)
                with profiled as profiler:
                    for it, batch in enumerate(batches, start=skip):
                        step, pending = self.advance(train_model, stage, params, batch, epoch + it / steps, pending)
                        stage.scheduler.step()  # after the step's optimizer step, wherever that ran
                        period.add({"loss": step.values[0], **step.stats,
                                    **{f"loss/{k}": step.values[2 + i] for i, k in enumerate(step.names)}})
                        run.step += 1
                        run.epoch_step = it + 1
                        if run.step % s.LOG_PERIOD == 0 or it == steps - 1:
                            self._log(stage, period.means(), step.values[1], run.global_epoch + (it + 1) / steps)
                            period = _PeriodMeans()
                        if it < steps - 1 and self._stop_requested(sync=run.step % s.LOG_PERIOD == 0):
                            self._judge(stage, pending)
                            self._stop(stage, best)
                        profiler.step()
                    self._judge(stage, pending)
                self._log_epoch_time(stage, epoch, steps - skip, time.perf_counter() - started, fed)
                run.stage_epoch, run.global_epoch, run.epoch_step = epoch + 1, run.global_epoch + 1, 0
                if epoch == start_epoch:  # the stage's graphs are compiled now: keep them for the next run
                    compile_cache.save(cache)
                last = epoch + 1 == stage.epochs
                if stage.evaluator is not None and ((epoch + 1) % s.EVAL_PERIOD == 0 or last):
                    if is_main_process():
                        compiles = self.cfg.MODEL.COMPILE and self._compiled_eval is None
                        last_results, best = self._evaluate(stage, best)
                        if compiles:  # the evaluation's graphs too, so that a warm run skips their compilation
                            compile_cache.save(cache)
                    barrier()
                saved = (epoch + 1) % s.CHECKPOINT_PERIOD == 0 or last
                if saved:
                    self.ckpt.save(f"epoch{run.global_epoch:04d}", model=self.model, optimizer=stage.optimizer,
                                   scheduler=stage.scheduler, scaler=self.amp.scaler, epoch=run.global_epoch,
                                   step=run.step, extra=self._extra(stage, best))
                if not last and self._stop_requested(sync=True):
                    self._stop(stage, best, saved=self.ckpt.latest() if saved else None)
        if self.ckpt is not None:
            self.ckpt.wait()  # the stage's checkpoints are on disk before anything marks it done
        return StageResult(last_results, best)

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, a stop signal (:data:`datasets.loader.STOP_SIGNALS`: SIGINT, SIGTERM, SIGUSR1 as
        SLURM's ``--signal`` sends before a time limit) asks for a stop at the next step boundary (with a
        checkpoint); a second one stops at once. Loader workers ignore them (the main process ends them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def request(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop_signal is not None:
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt(f"second {name}: stopped without a checkpoint")
            self._stop_signal = name
            logger.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", name)

        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, request)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self, sync: bool) -> bool:
        """Whether to stop here. One process: when it was signalled. Under DDP: when any rank was, decided
        only at ``sync`` points (every SOLVER.LOG_PERIOD steps and at epoch ends, one all-reduce), so that
        every rank stops at the same step."""
        if not is_dist():
            return self._stop_signal is not None
        if not sync:
            return False
        agreed = any_rank(self._stop_signal is not None)
        if agreed and self._stop_signal is None:
            self._stop_signal = "a signal to another rank"
        return agreed

    def _checkpoint_report(self) -> str:
        """What the run's last checkpoint is worth after the run blew up: absent, already out of range, or good."""
        latest = self.ckpt.latest() if self.ckpt is not None else None
        if latest is None:
            return "No checkpoint was written before this: there is nothing to resume from."
        weights = [t for t in read_checkpoint(latest)["model"].values() if t.is_floating_point() and t.numel()]
        peak = max((float(t.detach().abs().max()) for t in weights), default=0.0)
        if not math.isfinite(peak) or peak > WEIGHT_RANGE:
            return (f"The last checkpoint, {latest.name}, already holds weights up to {peak:.3g}: resume from an "
                    f"earlier one, or start again with a lower learning rate.")
        return (f"The last checkpoint, {latest.name}, holds weights in range (largest {peak:.3g}): --resume "
                f"continues from it, e.g. with a lower SOLVER.BASE_LR.")

    def _stop(self, stage: Stage, best: dict[str, Any], saved: Path | None = None) -> None:
        """Write the resumable state at this step boundary (unless just written) and raise :class:`RunInterrupted`."""
        path = saved
        if path is None and self.ckpt is not None:
            path = self.ckpt.save("interrupted", model=self.model, optimizer=stage.optimizer,
                                  scheduler=stage.scheduler, scaler=self.amp.scaler, epoch=self.run.global_epoch,
                                  step=self.run.step, extra=self._extra(stage, best), periodic=False)
        if self.ckpt is not None:
            self.ckpt.wait()
        barrier()
        raise RunInterrupted(self._stop_signal or "stop", path, self.run)

    # ------------------------------------------------------------------------------------------
    def _restore(self, stage: Stage) -> dict[str, Any]:
        """Restore the stage's optimizer, schedule, scaler, monitors and objective from the resume checkpoint."""
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
        where = f"epoch {self.run.stage_epoch}" + (f" and {self.run.epoch_step} steps" if self.run.epoch_step else "")
        logger.info("resuming stage %s after %s (step %d)", stage.name, where, self.run.step)
        if self.ckpt is not None:
            periodic = sorted(p.name for p in self.ckpt.save_dir.glob("checkpoint_epoch*.pth"))
            if len(periodic) >= self.ckpt.keep:
                logger.warning("this run keeps its newest %d periodic checkpoints: %s will be deleted as new ones "
                               "are written (copy them elsewhere to keep them)", self.ckpt.keep, ", ".join(periodic))
        return dict(extra["best"])

    def _extra(self, stage: Stage, best: dict[str, Any]) -> dict[str, Any]:
        return {"run": asdict(self.run), "spikes": self.spikes.state_dict(), "guard": self.guard.state_dict(),
                "objective": stage.objective.state_dict(), "best": best, "meta": checkpoint_meta(self.cfg)}

    def _eval_model(self) -> torch.nn.Module:
        """The model evaluation runs: the bare module, compiled (once per run) under ``MODEL.COMPILE``."""
        model = unwrap(self.model)
        if not self.cfg.MODEL.COMPILE:
            return model
        if self._compiled_eval is None:
            self._compiled_eval = compile_model(model, self.cfg.MODEL.COMPILE)
        return self._compiled_eval

    def _evaluate(self, stage: Stage, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        evaluator = stage.evaluator
        assert evaluator is not None
        started = time.perf_counter()
        results = evaluator(self._eval_model())
        seconds = time.perf_counter() - started
        logger.info("%s epoch %d: evaluation took %.1f s", stage.name, self.run.stage_epoch, seconds)
        self.metrics.log({"time/eval_s": seconds}, step=self.run.step, prefix=evaluator.prefix)
        for line in evaluator.lines(results):
            logger.info("%s epoch %d: %s", stage.name, self.run.stage_epoch, line)
        self.metrics.log(evaluator.scalars(results), step=self.run.step, prefix=evaluator.prefix)
        score = evaluator.score(results)
        if score > best["score"]:
            best = {"score": float(score), "epoch": self.run.global_epoch}
            self.ckpt.save("best", model=self.model, epoch=self.run.global_epoch, step=self.run.step,
                           extra={"run": asdict(self.run), "best": best, "meta": checkpoint_meta(self.cfg)},
                           periodic=False, resumable=False)
        return results, best

    def _log_epoch_time(self, stage: Stage, epoch: int, steps: int, seconds: float, fed: DataWait) -> None:
        """How long the epoch's training steps took (data loading included, evaluation not) and how much of it
        the loop spent waiting for the loader, as a log line and ``<prefix>/time/*`` metrics; the first epoch
        of a compiled run includes the compilation."""
        record = {"time/epoch_s": seconds, "time/steps_per_s": steps / max(seconds, 1e-9),
                  "time/data_wait_s": fed.seconds, "time/data_wait_first_s": fed.first_seconds}
        line = f"{stage.name} epoch {epoch + 1}: {steps} steps in {seconds:.1f} s ({record['time/steps_per_s']:.2f} steps/s"
        if stage.samples_per_step:
            record["time/samples_per_s"] = record["time/steps_per_s"] * stage.samples_per_step * get_world_size()
            line += f", {record['time/samples_per_s']:.0f} samples/s"
        logger.info(line + f"; {fed.seconds:.1f} s waiting for data, {fed.first_seconds:.1f} s of it for the first batch)")
        self.metrics.log(record, step=self.run.step, prefix=stage.log_prefix)

    def _log(self, stage: Stage, means: dict[str, float], grad_norm: float | torch.Tensor, epoch: float) -> None:
        groups = stage.optimizer.param_groups
        record: dict[str, Any] = {**means, "lr": groups[0]["lr"], "grad_norm": float(grad_norm), "epoch": epoch}
        record.update({f"lr/{g['name']}": g["lr"] for g in groups if "name" in g})
        record.update({f"monitor/{k}": v for k, v in {**self.spikes.stats(), **self.guard.stats()}.items()
                       if math.isfinite(v)})  # no NaN in metrics.jsonl (the spike threshold during warm-up)
        self.metrics.log(record, step=self.run.step, prefix=stage.log_prefix)


class _PeriodMeans:
    """Running sums of the values logged between two log steps (device tensors stay on the device)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.device_sums: dict[tuple[str, ...], torch.Tensor] = {}  # by the key set of the steps that added them
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        """Add one step's values: host numbers on the host, 0-d device tensors summed as one stacked tensor (two
        kernel launches per step instead of one per value)."""
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        for key, value in values.items():
            if key not in tensors:
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            by_device.setdefault(value.device, {})[key] = value
        for group in by_device.values():
            keys = tuple(group)
            stacked = torch.stack([v.detach().float().reshape(()) for v in group.values()])
            previous = self.device_sums.get(keys)
            self.device_sums[keys] = stacked if previous is None else previous + stacked
        self.count += 1

    def means(self) -> dict[str, float]:
        sums = dict(self.sums)
        for keys, stacked in self.device_sums.items():  # one host transfer per key set
            for key, value in zip(keys, stacked.tolist()):
                sums[key] = sums.get(key, 0.0) + value
        return {k: float(v) / self.count for k, v in sums.items()}


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile`` with a ``MODEL.COMPILE`` mode name (``default`` = torch's default mode)."""
    return torch.compile(model, mode=None if mode in ("", "default") else mode)


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
