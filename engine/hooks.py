"""The periodic work around the training loop, one small hook each.

:class:`engine.trainer.Trainer` calls every hook of a stage, in list order, at six points: before and after
the stage (``before_train`` / ``after_train``, the latter also when the stage stops early), each epoch and each
step. A hook reads what it needs from the trainer (``stage``, ``run``, ``epoch``, ``steps``, ``iteration``,
``last_step``, ``fed``, ``metrics``, ``ckpt``) and may keep state that a checkpoint carries
(:meth:`HookBase.state_dict`: merged into the checkpoint's ``extra``; :meth:`HookBase.load_state_dict` gets that
``extra`` back on resume). :func:`default_hooks` is the list every stage runs; a family adds its own through
``Stage.hooks`` (after the defaults). A new behaviour (EMA weights, another logger, a stop rule) is a new hook.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from engine import compile_cache
from engine.profiling import epoch_profiler
from utils.distributed import barrier, get_world_size, is_main_process
from utils.signals import STOP_SIGNALS

if TYPE_CHECKING:
    from engine.trainer import Trainer

logger = logging.getLogger(__name__)


class HookBase:
    """A hook: override the points it acts at. ``trainer`` is set when the stage starts."""

    trainer: Trainer

    def before_train(self) -> None:
        """The stage starts (after a resumed stage's state is restored)."""

    def after_train(self) -> None:
        """The stage ends, finished or stopped (also on an error)."""

    def before_epoch(self) -> None:
        """An epoch starts: its loader is ready, no step has run."""

    def after_epoch(self) -> None:
        """An epoch's steps are done and judged; ``trainer.run`` counts the epoch."""

    def before_step(self) -> None:
        """A step is about to be launched."""

    def after_step(self) -> None:
        """A step ran (``trainer.last_step``) and the schedule and counters moved on."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this hook (top-level keys of its ``extra``)."""
        return {}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint's ``extra``."""


class Profiler(HookBase):
    """``MONITOR.PROFILE_EPOCH``: a torch.profiler trace of ``MONITOR.PROFILE_STEPS`` steps of that epoch (rank 0)."""

    def __init__(self) -> None:
        self._open = contextlib.ExitStack()
        self._profiler: Any = None

    def before_epoch(self) -> None:
        t = self.trainer
        cfg = t.cfg.MONITOR
        profiled = epoch_profiler(t.epoch, cfg.PROFILE_EPOCH if is_main_process() else 0, cfg.PROFILE_STEPS,
                                  t.ckpt.save_dir / "profile", f"{t.stage.name}_epoch{t.epoch + 1}", t.device)
        self._profiler = self._open.enter_context(profiled)

    def after_step(self) -> None:
        self._profiler.step()

    def after_epoch(self) -> None:
        self._open.close()

    def after_train(self) -> None:
        self._open.close()


class EpochTimer(HookBase):
    """How long each epoch's training steps took (data loading included, evaluation not) and how much of it the
    loop spent waiting for the loader: a log line and ``<prefix>/time/*`` metrics. The first epoch of a compiled
    run includes the compilation."""

    def before_epoch(self) -> None:
        self._started = time.perf_counter()

    def after_epoch(self) -> None:
        t = self.trainer
        seconds, steps, fed = time.perf_counter() - self._started, t.steps - t.epoch_skip, t.fed
        record = {"time/epoch_s": seconds, "time/steps_per_s": steps / max(seconds, 1e-9),
                  "time/data_wait_s": fed.seconds, "time/data_wait_first_s": fed.first_seconds}
        line = (f"{t.stage.name} epoch {t.epoch + 1}: {steps} steps in {seconds:.1f} s "
                f"({record['time/steps_per_s']:.2f} steps/s")
        if t.stage.samples_per_step:
            record["time/samples_per_s"] = record["time/steps_per_s"] * t.stage.samples_per_step * get_world_size()
            line += f", {record['time/samples_per_s']:.0f} samples/s"
        logger.info(line + f"; {fed.seconds:.1f} s waiting for data, {fed.first_seconds:.1f} s of it for the first "
                           "batch)")
        t.metrics.log(record, step=t.run.step, prefix=t.stage.log_prefix)


class MetricWriter(HookBase):
    """Every ``SOLVER.LOG_PERIOD`` steps and at the end of an epoch: the means over the period of the loss, its
    terms and the objective's statistics, with the learning rates, the gradient norm and the monitors."""

    def before_epoch(self) -> None:
        self._period = PeriodMeans()

    def after_step(self) -> None:
        t = self.trainer
        step = t.last_step
        self._period.add({"loss": step.values[0], **step.stats,
                          **{f"loss/{k}": step.values[2 + i] for i, k in enumerate(step.names)}})
        if t.run.step % t.cfg.SOLVER.LOG_PERIOD == 0 or t.iteration == t.steps - 1:
            self._write(self._period.means(), step.values[1], t.run.global_epoch + (t.iteration + 1) / t.steps)
            self._period = PeriodMeans()

    def _write(self, means: dict[str, float], grad_norm: float | torch.Tensor, epoch: float) -> None:
        t = self.trainer
        groups = t.stage.optimizer.param_groups
        record: dict[str, Any] = {**means, "lr": groups[0]["lr"], "grad_norm": float(grad_norm), "epoch": epoch}
        record.update({f"lr/{g['name']}": g["lr"] for g in groups if "name" in g})
        record.update({f"monitor/{k}": v for k, v in {**t.spikes.stats(), **t.guard.stats()}.items()
                       if math.isfinite(v)})  # no NaN in metrics.jsonl (the spike threshold during warm-up)
        t.metrics.log(record, step=t.run.step, prefix=t.stage.log_prefix)


class BestCheckpoint(HookBase):
    """Evaluation every ``SOLVER.EVAL_PERIOD`` epochs and at the last one (rank 0), logged; the weights of the
    best score so far (``Evaluator.score``, higher is better) are kept as ``checkpoint_best.pth``."""

    def __init__(self) -> None:
        self.best: dict[str, Any] = {"score": -math.inf, "epoch": -1}
        self.results: dict[str, Any] | None = None
        self.compiled_now = False  # whether this epoch's evaluation compiled the evaluation model

    def after_epoch(self) -> None:
        t = self.trainer
        self.compiled_now = False
        last = t.epoch + 1 == t.stage.epochs
        if t.stage.evaluator is None or not ((t.epoch + 1) % t.cfg.SOLVER.EVAL_PERIOD == 0 or last):
            return
        if is_main_process():
            self.compiled_now = bool(t.cfg.MODEL.COMPILE) and t.compiled_eval is None
            self.results = self._evaluate()
        barrier()

    def _evaluate(self) -> dict[str, Any]:
        t = self.trainer
        evaluator, run = t.stage.evaluator, t.run
        started = time.perf_counter()
        results = evaluator(t.eval_model())
        seconds = time.perf_counter() - started
        logger.info("%s epoch %d: evaluation took %.1f s", t.stage.name, run.stage_epoch, seconds)
        t.metrics.log({"time/eval_s": seconds}, step=run.step, prefix=evaluator.prefix)
        for line in evaluator.lines(results):
            logger.info("%s epoch %d: %s", t.stage.name, run.stage_epoch, line)
        t.metrics.log(evaluator.scalars(results), step=run.step, prefix=evaluator.prefix)
        score = evaluator.score(results)
        if score > self.best["score"]:
            self.best = {"score": float(score), "epoch": run.global_epoch}
            t.ckpt.save("best", model=t.model, epoch=run.global_epoch, step=run.step,
                        extra={"run": t.run_record(), "best": self.best, "meta": t.meta()},
                        periodic=False, resumable=False)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        self.best = dict(extra["best"])


class CompileCache(HookBase):
    """Under ``MODEL.COMPILE``: torch.compile's artifacts loaded when the stage starts and saved once its graphs
    exist (after the first epoch, and after the evaluation that compiled the evaluation model), so that a warm
    run skips compiling them (rank 0; :mod:`engine.compile_cache`)."""

    def __init__(self, evaluation: BestCheckpoint) -> None:
        self.evaluation = evaluation

    def before_train(self) -> None:
        t = self.trainer
        self.path = compile_cache.cache_path(t.cfg, t.device, t.stage.name) if is_main_process() else None
        if t.cfg.MODEL.COMPILE:
            compile_cache.load(self.path)

    def after_epoch(self) -> None:
        if self.trainer.epoch == self.trainer.start_epoch or self.evaluation.compiled_now:
            compile_cache.save(self.path)


class PeriodicCheckpoint(HookBase):
    """The resumable state every ``SOLVER.CHECKPOINT_PERIOD`` epochs and at the stage's last one."""

    def after_epoch(self) -> None:
        t = self.trainer
        t.saved_this_epoch = (t.epoch + 1) % t.cfg.SOLVER.CHECKPOINT_PERIOD == 0 or t.epoch + 1 == t.stage.epochs
        if t.saved_this_epoch:
            t.save_checkpoint(f"epoch{t.run.global_epoch:04d}")


class SignalStop(HookBase):
    """A stop signal (:data:`datasets.loader.STOP_SIGNALS`: SIGINT, SIGTERM, SIGUSR1 as SLURM's ``--signal`` sends
    before a time limit) stops the stage at the next step boundary with a checkpoint (:meth:`Trainer.stop`); a
    second one stops at once. Under DDP every rank stops at the same step (:meth:`Trainer.stop_requested`)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        t = self.trainer
        if t.stop_signal is not None:
            signal.signal(signum, self._previous[signum])
            raise KeyboardInterrupt(f"second {name}: stopped without a checkpoint")
        t.stop_signal = name
        logger.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", name)

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def after_step(self) -> None:
        t = self.trainer
        if t.iteration < t.steps - 1 and t.stop_requested(sync=t.run.step % t.cfg.SOLVER.LOG_PERIOD == 0):
            t.judge_pending()
            t.stop()

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch + 1 < t.stage.epochs and t.stop_requested(sync=True):
            t.stop(saved=t.ckpt.latest() if t.saved_this_epoch else None)


def default_hooks() -> list[HookBase]:
    """The hooks every stage runs, in the order they act after an epoch: close the profile, time the epoch, write
    the period's metrics, evaluate (best checkpoint), save the compile cache, the periodic checkpoint, then stop
    if a signal asked to."""
    evaluation = BestCheckpoint()
    return [Profiler(), EpochTimer(), MetricWriter(), evaluation, CompileCache(evaluation), PeriodicCheckpoint(),
            SignalStop()]


class PeriodMeans:
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
        """The mean of every value added since the period began."""
        sums = dict(self.sums)
        for keys, stacked in self.device_sums.items():  # one host transfer per key set
            for key, value in zip(keys, stacked.tolist()):
                sums[key] = sums.get(key, 0.0) + value
        return {k: float(v) / self.count for k, v in sums.items()}
