"""Training monitors the trainer owns: a robust loss-spike detector and a non-finite step guard.

Both are plain objects with their own state and ``state_dict()`` /
``load_state_dict()`` (no state hidden in function attributes or globals), so a
resumed run continues counting where it stopped.

Typical use in the training loop::

    terms = {"id": l_id, "triplet": l_tri, "sdm": l_sdm}        # 0-d tensors
    loss = sum(terms.values())
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if guard.check(terms, grad_norm):                          # one host sync
        optimizer.step()
        spikes.update(float(loss))
    optimizer.zero_grad(set_to_none=True)                      # a skipped step is never applied

With an fp16 ``GradScaler`` pass the loss terms only (``grad_norm=None``): the scaler
already skips overflowing steps, and its first calibration steps overflow on purpose.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826  # MAD * 1.4826 estimates the standard deviation of a Gaussian


class SpikeDetector:
    """Rolling median + MAD loss-spike detector (window 100, warm-up 20, floors 0.05 and 15%, 6 sigmas).

    For each new value ``x`` (after ``warmup`` values have been seen) with ``med`` and
    ``mad`` the median and median absolute deviation of the last ``window`` values::

        mad_eff   = max(mad, mad_floor, rel_floor * |med|)
        threshold = med + n_sigmas * 1.4826 * mad_eff
        spike     = x > threshold

    Floors: ``mad_floor`` is an absolute floor on the spread, for the flat start of
    training where MAD is ~0 and any jitter would otherwise be a "spike" (without it the
    stability score reads 0.00 on a healthy run); ``rel_floor`` scales it with the loss level (a spread of
    at least 15% of the median), so a loss of 5.0 is not judged on the same absolute
    scale as a loss of 0.05. Both floors apply to the spread, not to the threshold.

    Every finite value enters the window, spikes included (the median is robust to
    them, and a lasting level shift is then accepted as the new normal after about
    half a window). A non-finite value counts as a spike and is not added.

    ``stability`` = 1 - spikes / checked, where ``checked`` counts values judged after
    warm-up (1.0 before any).
    """

    def __init__(
        self,
        window: int = 100,
        warmup: int = 20,
        mad_floor: float = 0.05,
        rel_floor: float = 0.15,
        n_sigmas: float = 6.0,
    ) -> None:
        if window < 1 or warmup < 1 or warmup > window:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup}, window={window}")
        if mad_floor < 0 or rel_floor < 0 or n_sigmas <= 0:
            raise ValueError("mad_floor and rel_floor must be >= 0 and n_sigmas > 0")
        self.window = int(window)
        self.warmup = int(warmup)
        self.mad_floor = float(mad_floor)
        self.rel_floor = float(rel_floor)
        self.n_sigmas = float(n_sigmas)
        self.history: deque[float] = deque(maxlen=self.window)
        self.steps = 0
        self.checked = 0
        self.spikes = 0
        self.last_threshold: float | None = None
        self.last_is_spike = False

    def _median_and_threshold(self) -> tuple[float, float] | None:
        """The window's median and the current threshold, or None during warm-up."""
        if len(self.history) < self.warmup:
            return None
        h = np.fromiter(self.history, dtype=np.float64)
        med = float(np.median(h))
        mad = float(np.median(np.abs(h - med)))
        mad_eff = max(mad, self.mad_floor, self.rel_floor * abs(med))
        return med, med + self.n_sigmas * MAD_TO_SIGMA * mad_eff

    def threshold(self) -> float | None:
        """Current threshold from the window, or None during warm-up."""
        band = self._median_and_threshold()
        return None if band is None else band[1]

    def update(self, value: float | torch.Tensor) -> bool:
        """Judge one loss value (judged against the window *before* it is added); True if a spike."""
        v = float(value)
        self.steps += 1
        thr = self.threshold()
        self.last_threshold = thr
        if not math.isfinite(v):
            is_spike = True
            self.checked += 1
        elif thr is None:
            is_spike = False
        else:
            is_spike = v > thr
            self.checked += 1
        if math.isfinite(v):
            self.history.append(v)
        if is_spike:
            self.spikes += 1
        self.last_is_spike = is_spike
        return is_spike

    def is_blowup(self, value: float, factor: float) -> bool:
        """True when ``value`` lies more than ``factor`` spike bands above the window's median (or is not
        finite); False during warm-up or with ``factor <= 0``. Does not change the detector's state."""
        if factor <= 0:
            return False
        return not math.isfinite(value) or value > self.blowup_threshold(factor)

    def blowup_threshold(self, factor: float) -> float:
        """The loss above which :meth:`is_blowup` is True: ``factor`` spike bands above the window's median
        (inf during warm-up or with ``factor <= 0``)."""
        band = self._median_and_threshold() if factor > 0 else None
        if band is None:
            return math.inf
        med, thr = band
        return med + factor * (thr - med)

    @property
    def stability(self) -> float:
        """1 - spikes / checked (1.0 when nothing was judged yet)."""
        return 1.0 - self.spikes / self.checked if self.checked else 1.0

    def stats(self) -> dict[str, float]:
        """Floats for logging: ``spikes``, ``stability``, ``spike_threshold`` (NaN in warm-up), ``loss_median``."""
        med = float(np.median(np.fromiter(self.history, dtype=np.float64))) if self.history else math.nan
        return {
            "spikes": float(self.spikes),
            "stability": self.stability,
            "spike_threshold": math.nan if self.last_threshold is None else self.last_threshold,
            "loss_median": med,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "steps": self.steps,
            "checked": self.checked,
            "spikes": self.spikes,
            "config": {
                "window": self.window, "warmup": self.warmup, "mad_floor": self.mad_floor,
                "rel_floor": self.rel_floor, "n_sigmas": self.n_sigmas,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and window (the current config's window length is kept)."""
        cfg = state.get("config", {})
        if cfg and cfg != self.state_dict()["config"]:
            logger.warning("SpikeDetector: resuming with config %s (checkpoint had %s)", self.state_dict()["config"], cfg)
        self.history = deque((float(v) for v in state["history"]), maxlen=self.window)
        self.steps = int(state["steps"])
        self.checked = int(state["checked"])
        self.spikes = int(state["spikes"])


class NonFiniteLossError(UserError, RuntimeError):
    """Raised by :class:`NonFiniteGuard` after too many non-finite steps in a row."""


class NonFiniteGuard:
    """Decides whether a step may be applied: skip and count steps whose loss or gradient is NaN/Inf.

    :meth:`check` takes the step's named loss terms (0-d tensors or floats) and
    optionally the gradient norm; it moves them to the host in one transfer. A step
    with any non-finite value returns False (the trainer must not call
    ``optimizer.step()``), is counted and logged with the offending names. After
    ``max_consecutive`` non-finite steps in a row it raises :class:`NonFiniteLossError`
    naming the terms, so the run stops before anything bad is written (the last
    checkpoint on disk was written from a good step).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.steps = 0
        self.skipped = 0
        self.consecutive = 0
        self.last_bad: list[str] = []
        self.bad_counts: dict[str, int] = {}

    def check(
        self,
        terms: Mapping[str, torch.Tensor | float],
        grad_norm: torch.Tensor | float | None = None,
        also_bad: Sequence[str] = (),
    ) -> bool:
        """True if every term (and the grad norm, if given) is finite and ``also_bad`` (other reasons not
        to apply the step, e.g. a loss blow-up) is empty; else count, log, maybe raise."""
        names = list(terms)
        values: list[torch.Tensor | float] = list(terms.values())
        if grad_norm is not None:
            names.append("grad_norm")
            values.append(grad_norm)
        finite = self._all_finite(values)
        self.steps += 1
        bad = [n for n, ok in zip(names, finite) if not ok] + list(also_bad)
        if not bad:
            self.consecutive = 0
            self.last_bad = []
            return True
        return self.reject(bad)

    def reject(self, bad: list[str]) -> bool:
        """Count a step that must not be applied (``bad``: what was wrong with it), log it, and raise
        :class:`NonFiniteLossError` after ``max_consecutive`` in a row. Returns False."""
        self.skipped += 1
        self.consecutive += 1
        self.last_bad = bad
        for n in bad:
            self.bad_counts[n] = self.bad_counts.get(n, 0) + 1
        logger.warning(
            "step %d skipped (not applied): %s (%d in a row, %d skipped in total)",
            self.steps, ", ".join(bad), self.consecutive, self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} training steps in a row could not be applied (last: {', '.join(bad)}; counts: "
                f"{self.bad_counts}); stopping. Lower the learning rate, check the data, or raise "
                f"MONITOR.MAX_NONFINITE_STEPS (now {self.max_consecutive})."
            )
        return False

    @staticmethod
    def _all_finite(values: list[torch.Tensor | float]) -> list[bool]:
        """Per value: every element finite. Tensors go to the host in one transfer."""
        out: list[bool | None] = [None] * len(values)
        flags: list[torch.Tensor] = []
        idx: list[int] = []
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                flags.append(torch.isfinite(v.detach()).all())
                idx.append(i)
            else:
                out[i] = math.isfinite(float(v))
        if flags:
            host = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
            for i, f in zip(idx, host):
                out[i] = bool(f)
        return [bool(o) for o in out]

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def stats(self) -> dict[str, float]:
        """Floats for logging: ``nonfinite_skipped``, ``nonfinite_consecutive``, ``nonfinite_rate``."""
        return {
            "nonfinite_skipped": float(self.skipped),
            "nonfinite_consecutive": float(self.consecutive),
            "nonfinite_rate": self.skip_rate,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive,
            "bad_counts": dict(self.bad_counts), "max_consecutive": self.max_consecutive,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters (``max_consecutive`` stays as configured now)."""
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
        self.bad_counts = {str(k): int(v) for k, v in state.get("bad_counts", {}).items()}
