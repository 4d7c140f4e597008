"""The one optimisation step of both families (:class:`StepRunner`): forward under autocast -> loss in fp32 ->
backward through the grad scaler -> unscale -> clip (``SOLVER.GRAD_CLIP``) -> the step is applied unless a
value is non-finite or a blow-up (:class:`engine.monitor.NonFiniteGuard`) -> spike detector.

With ``MONITOR.DEFER_CHECKS`` and a fused optimizer the device applies or skips the step itself and the host
reads the step's values (one transfer) while the next step runs (:meth:`StepRunner.advance`); otherwise the host
waits for them before the optimizer step. :class:`engine.trainer.Trainer` runs these steps in its loop; a
benchmark runs them alone (:meth:`StepRunner.run_step`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.checkpoint import read_checkpoint
from engine.device import AmpPolicy
from engine.monitor import NonFiniteGuard, NonFiniteLossError, SpikeDetector

if TYPE_CHECKING:
    from engine.checkpoint import Checkpointer
    from engine.trainer import Stage

logger = logging.getLogger(__name__)

#: a weight larger than this (in absolute value) means the model has blown up
WEIGHT_RANGE = 1e4


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


class StepRunner:
    """The optimisation step with its monitors (spike detector, non-finite guard) and precision policy.

    Args:
        cfg: the frozen config (``SOLVER.GRAD_CLIP``, ``MONITOR``, ``MODEL.COMPILE``).
        amp: the autocast and grad-scaler policy.
    """

    ckpt: Checkpointer | None = None

    def __init__(self, cfg: Any, amp: AmpPolicy) -> None:
        self.cfg, self.amp = cfg, amp
        self.spikes, self.guard = self.new_monitors()
        #: the objective's compiled forward + loss (``MODEL.COMPILE_SCOPE step``), set by :meth:`compile_stage`
        self.compiled_step: Callable[..., tuple] | None = None

    def new_monitors(self) -> tuple[SpikeDetector, NonFiniteGuard]:
        """A fresh spike detector and non-finite guard from ``MONITOR``."""
        m = self.cfg.MONITOR
        return (SpikeDetector(m.SPIKE_WINDOW, m.SPIKE_WARMUP, m.SPIKE_MAD_FLOOR, m.SPIKE_REL_FLOOR, m.SPIKE_SIGMAS),
                NonFiniteGuard(m.MAX_NONFINITE_STEPS))

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


def compile_model(model: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``torch.compile`` of a module or function with a ``MODEL.COMPILE`` mode name (``default`` = torch's
    default mode).

    Under deterministic algorithms (``DETERMINISTIC True``) inductor compiles in its deterministic mode as well:
    it chooses kernel configurations without timing them on the device, because the fastest tiling of a
    reduction may differ from one run to the next, and with it the order of the sum.
    """
    mode_name = None if mode in ("", "default") else mode
    if not torch.are_deterministic_algorithms_enabled():
        return torch.compile(model, mode=mode_name)
    import torch._inductor as inductor  # only a deterministic compile needs its mode table

    options = dict(inductor.list_mode_options(mode_name)) if mode_name else {}
    if hasattr(inductor.config, "deterministic"):
        options["deterministic"] = True
    return torch.compile(model, options=options or None)

