"""A learnable scale that cannot run away: the one layer behind every learnable scale in the repo.

Why: an unbounded scale multiplying attention logits (or an attention bias) tends to
grow (2.5 -> 5.8 -> 12.3 -> 45.7 over epochs; docs/decisions.md) until softmax
saturates and its gradient vanishes (the two-way softmax derivative p(1 - p) is 0.25
at a logit gap of 0, 0.007 at 5, ~0 at 10). ``BoundedScale`` owns the parameter and
enforces a range in one of four ways, chosen by ``constraint``:

``clamp``
    forward returns ``value.clamp(min, max)``. Simplest; the gradient is zero once
    the value sits at or beyond a bound (PyTorch's clamp passes no gradient there).
``sigmoid``
    re-parameterisation that can never leave ``[min, max]`` and always has a gradient.
    With ``parameterization='raw'``: ``min + (max - min) * sigmoid(p)``.
    With ``parameterization='log'``: the same in log space,
    ``exp(log min + (log max - log min) * sigmoid(p))`` (needs ``min > 0``), so that
    equal steps of ``p`` change the scale by equal factors, as ``log`` does elsewhere.
``penalty``
    soft pull towards the initial value: :meth:`penalty` returns
    ``coef * sum((scale - init)^2)`` for the trainer to add to the loss. Bounds, if
    given, are still enforced by a clamp as a hard backstop.
``none``
    unconstrained (bounds, if given, are only used for the ``at_bound`` statistic).

``parameterization`` says what the stored parameter is: ``log`` (the scale is
``exp(p)``, always positive; CLIP's logit scale) or ``raw`` (the scale is ``p``).
For ``sigmoid`` the parameter is the logit of the position inside the range.

The parameter is always registered as ``raw`` (``named_parameters()`` shows
``<prefix>.raw``), so a model can expose the very same ``nn.Parameter`` under its own
name, e.g. SAP's ``logit_scale_log``::

    self.logit_scale = BoundedScale(25.0, max_value=100.0)   # log + clamp: exp(p).clamp(max=100)

    @property
    def logit_scale_log(self) -> nn.Parameter:              # the same object, for the optimizer
        return self.logit_scale.raw

Statistics (:meth:`stats`) are accumulated on the device without host syncs and only
converted to floats when asked for. A warning past ``warn_threshold`` goes through the
``logging`` module, checked once every ``warn_every`` forward calls (one host sync per
check), never printed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Parameterization = Literal["log", "raw"]
Constraint = Literal["clamp", "sigmoid", "penalty", "none"]

#: In ``sigmoid`` mode a scale counts as "at the bound" when sigmoid(p) is within this
#: fraction of the range from either edge (it can never equal the bound exactly).
SIGMOID_AT_BOUND_TOL = 0.01


def _checked_init(
    init: float | torch.Tensor,
    shape: Sequence[int],
    min_value: float | None,
    max_value: float | None,
    parameterization: str,
    constraint: str,
    warn_every: int,
) -> torch.Tensor:
    """:class:`BoundedScale`'s arguments checked; returns the initial scale as a float32 tensor of ``shape``.

    Raises ``ValueError`` naming the first argument that is out of range or inconsistent with the others.
    """
    if parameterization not in ("log", "raw"):
        raise ValueError(f"parameterization must be 'log' or 'raw', got {parameterization!r}")
    if constraint not in ("clamp", "sigmoid", "penalty", "none"):
        raise ValueError(f"constraint must be clamp/sigmoid/penalty/none, got {constraint!r}")
    if min_value is not None and max_value is not None and not min_value < max_value:
        raise ValueError(f"need min_value < max_value, got [{min_value}, {max_value}]")
    if warn_every < 1:
        raise ValueError(f"warn_every must be >= 1, got {warn_every}")

    init_t = torch.as_tensor(init, dtype=torch.float32).detach().clone()
    shape = tuple(shape)
    if init_t.dim() == 0 and shape:
        init_t = init_t.expand(shape).clone()
    if tuple(init_t.shape) != shape:
        raise ValueError(f"init has shape {tuple(init_t.shape)} but shape={shape}")
    if min_value is not None and bool((init_t < min_value).any()):
        raise ValueError(f"init {init_t.tolist()} is below min_value {min_value}")
    if max_value is not None and bool((init_t > max_value).any()):
        raise ValueError(f"init {init_t.tolist()} is above max_value {max_value}")
    if parameterization == "log":
        if bool((init_t <= 0).any()):
            raise ValueError(f"log parameterization needs init > 0, got {init_t.tolist()}")
        if min_value is not None and min_value < 0:
            raise ValueError(f"log parameterization gives positive scales; min_value {min_value} < 0")
    if constraint == "sigmoid":
        if min_value is None or max_value is None:
            raise ValueError("constraint='sigmoid' needs both min_value and max_value")
        if parameterization == "log" and min_value <= 0:
            raise ValueError("constraint='sigmoid' with parameterization='log' needs min_value > 0")
        if not bool(((init_t > min_value) & (init_t < max_value)).all()):
            raise ValueError(f"constraint='sigmoid' needs min < init < max, got init {init_t.tolist()}")
    return init_t


class BoundedScale(nn.Module):
    """A learnable (or fixed) positive-or-raw scale kept inside ``[min_value, max_value]``.

    Args:
        init: initial effective scale (a float, or a tensor of ``shape``).
        min_value, max_value: bounds; either may be ``None`` for ``clamp``/``penalty``/``none``;
            both are required for ``sigmoid``.
        parameterization: ``"log"`` (scale = exp(p)) or ``"raw"`` (scale = p).
        constraint: ``"clamp"``, ``"sigmoid"``, ``"penalty"`` or ``"none"`` (see module doc).
        penalty_coef: ``coef`` of :meth:`penalty` (``penalty`` mode only).
        warn_threshold: log a warning when the largest scale element exceeds this.
        warn_every: check the threshold once every this many forward calls.
        learnable: ``False`` stores the parameter as a buffer (no gradient, not in
            ``parameters()``), so an ablation can freeze the scale with the same code path.
        shape: shape of the scale, e.g. ``(num_heads,)`` for one scale per head; ``()`` scalar.
        name: label used in warnings.

    ``forward()`` returns the effective scale tensor of ``shape`` (float32).
    """

    def __init__(
        self,
        init: float | torch.Tensor,
        min_value: float | None = None,
        max_value: float | None = None,
        parameterization: Parameterization = "log",
        constraint: Constraint = "clamp",
        penalty_coef: float = 1e-3,
        warn_threshold: float | None = None,
        warn_every: int = 100,
        learnable: bool = True,
        shape: Sequence[int] = (),
        name: str = "scale",
    ) -> None:
        super().__init__()
        init_t = _checked_init(init, shape, min_value, max_value, parameterization, constraint, warn_every)
        self.parameterization = parameterization
        self.constraint = constraint
        self.min_value = None if min_value is None else float(min_value)
        self.max_value = None if max_value is None else float(max_value)
        self.penalty_coef = float(penalty_coef)
        self.warn_threshold = None if warn_threshold is None else float(warn_threshold)
        self.warn_every = int(warn_every)
        self.learnable = learnable
        self.shape = tuple(shape)
        self.name = name

        self.register_buffer("init_value", init_t.clone())
        p = self._to_param(init_t)
        self.raw: torch.Tensor  # ``nn.Parameter`` when learnable, else a buffer (same name either way)
        if learnable:
            self.raw = nn.Parameter(p)
        else:
            self.register_buffer("raw", p)
        # Running statistics: integer device tensors (no host sync in forward), not in state_dict.
        self.register_buffer("_n_seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("_n_at_bound", torch.zeros((), dtype=torch.int64), persistent=False)
        self._calls = 0
        self._warnings_issued = 0

    # ------------------------------------------------------------------ parameter <-> value
    def _log_bounds(self) -> tuple[float, float]:
        assert self.min_value is not None and self.max_value is not None
        return math.log(self.min_value), math.log(self.max_value)

    def _to_param(self, value: torch.Tensor) -> torch.Tensor:
        """Inverse map: the parameter that gives effective scale ``value``."""
        value = value.to(torch.float32)
        if self.constraint == "sigmoid":
            assert self.min_value is not None and self.max_value is not None
            if self.parameterization == "log":
                lo, hi = self._log_bounds()
                u = (value.log() - lo) / (hi - lo)
            else:
                u = (value - self.min_value) / (self.max_value - self.min_value)
            u = u.clamp(1e-6, 1 - 1e-6)
            return torch.log(u) - torch.log1p(-u)
        return value.log() if self.parameterization == "log" else value.clone()

    def _unconstrained(self) -> torch.Tensor:
        """The value before any clamp (for ``sigmoid``: the already-bounded value)."""
        p = self.raw
        if self.constraint == "sigmoid":
            assert self.min_value is not None and self.max_value is not None
            u = torch.sigmoid(p)
            if self.parameterization == "log":
                lo, hi = self._log_bounds()
                return torch.exp(lo + (hi - lo) * u)
            return self.min_value + (self.max_value - self.min_value) * u
        return p.exp() if self.parameterization == "log" else p

    def _bounded(self, value: torch.Tensor) -> torch.Tensor:
        if self.constraint in ("clamp", "penalty") and (
            self.min_value is not None or self.max_value is not None
        ):
            return value.clamp(min=self.min_value, max=self.max_value)
        return value

    def _at_bound_mask(self, value: torch.Tensor) -> torch.Tensor:
        """Boolean mask of elements at (clamp) or saturated near (sigmoid) a bound."""
        if self.constraint == "sigmoid":
            u = torch.sigmoid(self.raw.detach())
            return (u < SIGMOID_AT_BOUND_TOL) | (u > 1 - SIGMOID_AT_BOUND_TOL)
        mask = torch.zeros_like(value, dtype=torch.bool)
        if self.max_value is not None:
            mask |= value >= self.max_value
        if self.min_value is not None:
            mask |= value <= self.min_value
        return mask

    # ------------------------------------------------------------------ public API
    def forward(self) -> torch.Tensor:
        """Effective scale, shape ``self.shape``; records at-bound statistics and maybe warns."""
        unconstrained = self._unconstrained()
        scale = self._bounded(unconstrained)
        with torch.no_grad():
            self._n_seen += unconstrained.numel()
            self._n_at_bound += self._at_bound_mask(unconstrained.detach()).sum()
        if self.warn_threshold is not None:
            self._count_and_maybe_warn(scale.detach())
        return scale

    @torch.compiler.disable
    def _count_and_maybe_warn(self, scale: torch.Tensor) -> None:
        """Count this call and check the threshold every ``warn_every`` calls. Host-side state: kept out of a
        compiled graph, where a Python counter that changes every call would recompile it every call."""
        self._calls += 1
        if (self._calls - 1) % self.warn_every == 0:
            self._maybe_warn(scale)

    def value(self) -> torch.Tensor:
        """Effective scale without touching statistics or warnings (detached)."""
        with torch.no_grad():
            return self._bounded(self._unconstrained()).detach().clone()

    def penalty(self) -> torch.Tensor:
        """``coef * sum((scale - init)^2)`` in ``penalty`` mode, a 0-d zero otherwise.

        Differentiable w.r.t. the parameter; the trainer adds it to the loss.
        """
        if self.constraint != "penalty":
            return self.raw.new_zeros(())
        scale = self._bounded(self._unconstrained())
        return self.penalty_coef * (scale - self.init_value).pow(2).sum()

    @torch.no_grad()
    def set_value(self, value: float | torch.Tensor) -> None:
        """Set the parameter so that the *unconstrained* scale equals ``value``.

        E.g. ``set_value(200.0)`` on a log/clamp scale with max 100 stores log(200);
        ``forward()`` then returns exactly 100. In ``sigmoid`` mode ``value`` is first
        limited to just inside the range.
        """
        v = torch.as_tensor(value, dtype=torch.float32, device=self.raw.device).expand(self.shape)
        if self.parameterization == "log" and bool((v <= 0).any()):
            raise ValueError(f"{self.name}: a log-parameterised scale must be > 0, got {v.tolist()}")
        self.raw.copy_(self._to_param(v))

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Floats for logging: ``value`` (mean effective scale), ``value_max``, and
        ``at_bound`` (fraction of elements, over all forward calls since the last reset,
        that were at a bound; in ``sigmoid`` mode: within 1% of the range of one).
        One host sync per call; meant for the trainer's logging step, not the hot loop."""
        v = self.value()
        n_seen = float(self._n_seen)
        out = {
            "value": float(v.mean()),
            "value_max": float(v.max()),
            "at_bound": float(self._n_at_bound) / n_seen if n_seen > 0 else 0.0,
        }
        if reset:
            self.reset_stats()
        return out

    def reset_stats(self) -> None:
        """Zero the at-bound counters (e.g. at each logging step or epoch)."""
        self._n_seen.zero_()
        self._n_at_bound.zero_()

    def _maybe_warn(self, scale: torch.Tensor) -> None:
        assert self.warn_threshold is not None
        vmax = float(scale.max())
        if vmax > self.warn_threshold:
            self._warnings_issued += 1
            logger.warning(
                "%s = %.4g exceeds warn_threshold %.4g (bounds [%s, %s], constraint %s); "
                "softmax over these logits may be saturating (checked every %d calls)",
                self.name, vmax, self.warn_threshold, self.min_value, self.max_value,
                self.constraint, self.warn_every,
            )

    @property
    def warnings_issued(self) -> int:
        """How many threshold warnings this instance has logged."""
        return self._warnings_issued

    def extra_repr(self) -> str:
        return (
            f"init={self.init_value.tolist()}, min={self.min_value}, max={self.max_value}, "
            f"parameterization={self.parameterization}, constraint={self.constraint}, "
            f"learnable={self.learnable}"
        )
