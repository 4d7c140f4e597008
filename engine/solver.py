"""Optimizers from parameter groups, and learning-rate schedules: per-step with a linear warm-up
(:class:`WarmupScheduler`), or per-epoch with timm's cosine (:class:`EpochCosineScheduler`, DeMo's schedule).

A schedule has ``begin_epoch(epoch)``, called by the trainer before each epoch's first step, and ``step()``,
called after each optimizer step; each kind acts on the one it is stepped by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

#: ``SOLVER.OPTIMIZER`` names: the optimizers :func:`build_optimizer` builds
OPTIMIZERS = ("SGD", "Adam", "AdamW")
#: ``SOLVER.SCHEDULER`` names: stepped per optimizer step, and stepped per epoch
STEP_SCHEDULES = ("cosine", "step")
EPOCH_SCHEDULES = ("timm_cosine",)


def build_optimizer(
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter],
    name: str = "SGD",
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    nesterov: bool = True,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over ``param_groups``; a group's own ``lr``/``weight_decay`` wins.

    ``fused`` (default: when every parameter is on a CUDA device or the CPU) uses the single-kernel
    implementation, which removes most of the optimizer's launch overhead on a GPU and can skip a step
    on the device (``found_inf``: see ``MONITOR.DEFER_CHECKS``).
    """
    items = list(param_groups)
    if items and not isinstance(items[0], dict):  # a plain iterable of parameters: one group
        items = [{"params": items}]
    groups = [{**g, "params": list(g["params"])} for g in items]
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    extra = {"fused": True} if fused else {}
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               **extra)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, **extra)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **extra)
    raise ValueError(f"SOLVER.OPTIMIZER must be one of {', '.join(OPTIMIZERS)}, got '{name}'")


def build_model_optimizer(cfg: Any, groups: Sequence[dict[str, Any]], base_lr: float) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` (momentum, Nesterov from ``SOLVER``) over ``groups``: a model's optimizer groups and any
    of a criterion's, each with its own ``lr`` and ``weight_decay`` where it sets them (else ``base_lr`` and
    ``SOLVER.WEIGHT_DECAY``)."""
    s = cfg.SOLVER
    return build_optimizer(list(groups), s.OPTIMIZER, lr=base_lr, weight_decay=s.WEIGHT_DECAY, momentum=s.MOMENTUM,
                           nesterov=s.NESTEROV)


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.01,
    mode: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Warm-up: linear from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``.
    Then ``cosine``: half-cosine from 1 down to ``min_factor`` at ``total_steps``;
    or ``step``: ``gamma ** (number of milestones <= step)``.
    """
    if step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor + (1.0 - warmup_factor) * alpha
    if mode == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if mode == "step":
        return gamma ** sum(1 for m in milestones if step >= m)
    raise ValueError(f"SOLVER.SCHEDULER must be cosine or step, got '{mode}'")


class WarmupScheduler(LRScheduler):
    """Per-step LR schedule in closed form (so resuming only needs the step counter).

    Call ``step()`` once per optimizer step. Every param group keeps its own base LR
    (e.g. backbone 1e-5, new modules 5e-5) and is scaled by the same factor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.01,
        mode: str = "cosine",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        lr_factor(0, total_steps, warmup_steps, warmup_factor, mode, milestones, gamma, min_factor)  # validate
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.mode = mode
        self.milestones = list(milestones)
        self.gamma = gamma
        self.min_factor = min_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """LR multiplier at ``step``."""
        return lr_factor(
            step, self.total_steps, self.warmup_steps, self.warmup_factor,
            self.mode, self.milestones, self.gamma, self.min_factor,
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def begin_epoch(self, epoch: int) -> None:
        """Nothing: this schedule moves with the optimizer steps."""


class EpochCosineScheduler:
    """timm's ``CosineLRScheduler`` set at the start of each epoch, as DeMo's training runs it.

    Epochs are counted from 1 (``begin_epoch(0)`` sets epoch 1). Warm-up: from ``warmup_lr_init`` linearly
    towards each group's own rate over ``warmup_epochs``; then a half cosine from each group's rate at epoch
    0 (the warm-up is not a prefix) down to ``lr_min`` at ``epochs``. ``warmup_lr_init`` and ``lr_min`` are
    absolute and the same for every group, so a group whose rate lies below ``warmup_lr_init`` (a
    pretrained backbone's) falls during the warm-up. Each epoch below ``epochs`` is multiplied by
    ``1 + n``, ``n ~ N(0, noise_std)`` redrawn until ``|n| < noise_pct`` from a generator seeded
    ``noise_seed + epoch`` (``noise_pct`` 0: no noise).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, *, warmup_epochs: int = 0,
                 warmup_lr_init: float = 0.0, lr_min: float = 0.0, noise_pct: float = 0.0,
                 noise_std: float = 1.0, noise_seed: int = 42) -> None:
        from timm.scheduler import CosineLRScheduler

        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.optimizer, self.epoch = optimizer, 0
        self.timm = CosineLRScheduler(
            optimizer, t_initial=epochs, lr_min=lr_min, cycle_mul=1.0, cycle_decay=0.1, cycle_limit=1,
            warmup_t=warmup_epochs, warmup_lr_init=warmup_lr_init, warmup_prefix=False, t_in_epochs=True,
            noise_range_t=(0, epochs) if noise_pct > 0 else None, noise_pct=noise_pct, noise_std=noise_std,
            noise_seed=noise_seed,
        )

    def begin_epoch(self, epoch: int) -> None:
        """Set the rates of the 0-based trainer epoch ``epoch`` (DeMo's epoch ``epoch + 1``)."""
        self.epoch = epoch + 1
        self.timm.step(self.epoch)

    def step(self, epoch: int | None = None) -> None:
        """After an optimizer step (no argument): nothing, this schedule moves with the epochs. ``step(epoch)``
        is timm's and DeMo's call: set the rates of the 1-based ``epoch``."""
        if epoch is not None:
            self.begin_epoch(epoch - 1)

    def state_dict(self) -> dict[str, Any]:
        """The epoch last set; the schedule itself is the config's (a resumed run follows the config)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> WarmupScheduler | EpochCosineScheduler:
    """Schedule from ``cfg.SOLVER``: ``SOLVER.SCHEDULER`` ``cosine`` / ``step`` per optimizer step (epochs
    converted to steps with ``steps_per_epoch``), ``timm_cosine`` per epoch (:class:`EpochCosineScheduler`
    with warm-up start ``WARMUP_FACTOR x BASE_LR`` and floor ``MIN_LR_FACTOR x BASE_LR``, both absolute,
    and the ``SOLVER.LR_NOISE*`` keys)."""
    s = cfg.SOLVER
    if s.SCHEDULER in EPOCH_SCHEDULES:
        return EpochCosineScheduler(
            optimizer, s.MAX_EPOCHS, warmup_epochs=s.WARMUP_EPOCHS, warmup_lr_init=s.WARMUP_FACTOR * s.BASE_LR,
            lr_min=s.MIN_LR_FACTOR * s.BASE_LR, noise_pct=s.LR_NOISE, noise_std=s.LR_NOISE_STD,
            noise_seed=s.LR_NOISE_SEED,
        )
    return WarmupScheduler(
        optimizer,
        total_steps=s.MAX_EPOCHS * steps_per_epoch,
        warmup_steps=s.WARMUP_EPOCHS * steps_per_epoch,
        warmup_factor=s.WARMUP_FACTOR,
        mode=s.SCHEDULER,
        milestones=[e * steps_per_epoch for e in s.STEPS],
        gamma=s.GAMMA,
        min_factor=s.MIN_LR_FACTOR,
    )


#: what a schedule is made of (the rest of a scheduler's state is where it is: ``last_epoch``, ``_step_count``)
SCHEDULE_FIELDS = ("total_steps", "warmup_steps", "warmup_factor", "mode", "milestones", "gamma", "min_factor",
                   "base_lrs")
#: optimizer settings a config sets per group (``lr`` follows the schedule)
OPTIMIZER_FIELDS = ("weight_decay", "momentum", "nesterov", "betas", "eps")


def adopt_configured_schedule(scheduler: LRScheduler, optimizer: torch.optim.Optimizer,
                              configured: dict[str, Any], configured_groups: Sequence[dict[str, Any]]) -> list[str]:
    """After a checkpoint's optimizer and schedule are loaded: keep the restored step and moments, but the
    config's schedule and optimizer settings where they differ. Returns ``"what: old -> new"`` per change.

    ``configured`` is the scheduler's ``state_dict()`` and ``configured_groups`` the optimizer's param
    groups as the config built them, taken before loading. A run resumed with more epochs or another
    learning rate thus continues on the new schedule from where it stopped, instead of on the old one
    (which, past its end, leaves the learning rate at its floor).
    """
    restored = scheduler.state_dict()
    fields = [k for k in SCHEDULE_FIELDS if k in configured]  # another scheduler class: what it shares
    schedule = [f"{k} {restored.get(k)} -> {configured[k]}" for k in fields if restored.get(k) != configured[k]]
    settings = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, configured_groups)):
        for key in OPTIMIZER_FIELDS:
            if key in wanted and group.get(key) != wanted[key]:
                settings.append(f"{group.get('name', f'group {i}')} {key} {group.get(key)} -> {wanted[key]}")
                group[key] = wanted[key]
    if schedule:
        scheduler.load_state_dict({**restored, **{k: configured[k] for k in fields}})
        lrs = scheduler.get_lr()
        for group, lr, base in zip(optimizer.param_groups, lrs, configured["base_lrs"]):
            group["lr"], group["initial_lr"] = lr, base
        scheduler._last_lr = list(lrs)
    return schedule + settings
