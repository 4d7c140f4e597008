"""The SDM loss's temperature schedule: init -> final over the first epochs, a softer fallback after a
non-finite SDM value, every value clamped (``LOSS.SDM.*_TEMPERATURE``)."""

from __future__ import annotations

import math
from collections.abc import Mapping


class SDMTemperature:
    """Temperature schedule for SDM: init -> final, fallback after a non-finite loss.

    ``value(epoch)`` interpolates linearly from ``init`` (epoch 0) to ``final`` (epoch
    ``anneal_epochs`` and after). After :meth:`observe` sees a non-finite SDM loss, the
    temperature is ``fallback`` (softer, more stable) for the next ``fallback_steps``
    observed steps, then returns to the schedule. Every value is clamped to
    ``[min_value, max_value]``. The trainer owns one instance; it has a ``state_dict``
    so a resumed run continues the same fallback window and counters.
    """

    def __init__(
        self,
        init: float = 0.20,
        final: float = 0.18,
        fallback: float = 0.25,
        anneal_epochs: float = 10.0,
        min_value: float = 0.15,
        max_value: float = 0.5,
        fallback_steps: int = 100,
    ) -> None:
        if not 0 < min_value <= max_value:
            raise ValueError(f"need 0 < min_value <= max_value, got [{min_value}, {max_value}]")
        if anneal_epochs < 0 or fallback_steps < 0:
            raise ValueError("anneal_epochs and fallback_steps must be >= 0")
        self.init, self.final, self.fallback = float(init), float(final), float(fallback)
        self.anneal_epochs = float(anneal_epochs)
        self.min_value, self.max_value = float(min_value), float(max_value)
        self.fallback_steps = int(fallback_steps)
        self.epoch = 0.0
        self.fallback_left = 0
        self.num_fallbacks = 0

    def _clamp(self, t: float) -> float:
        return min(max(t, self.min_value), self.max_value)

    def scheduled(self, epoch: float | None = None) -> float:
        """The scheduled (non-fallback) temperature at ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else float(epoch)
        frac = 1.0 if self.anneal_epochs == 0 else min(max(e / self.anneal_epochs, 0.0), 1.0)
        return self._clamp(self.init + (self.final - self.init) * frac)

    def value(self, epoch: float | None = None) -> float:
        """Temperature to use now: the fallback while its window lasts, else the schedule."""
        if self.fallback_left > 0:
            return self._clamp(self.fallback)
        return self.scheduled(epoch)

    def set_epoch(self, epoch: float) -> None:
        """Set the (possibly fractional) epoch the schedule reads."""
        self.epoch = float(epoch)

    def observe(self, loss_value: float) -> float:
        """Report this step's SDM loss (a float); returns the temperature for the next step."""
        if not math.isfinite(loss_value):
            self.fallback_left = self.fallback_steps
            self.num_fallbacks += 1
        elif self.fallback_left > 0:
            self.fallback_left -= 1
        return self.value()

    def state_dict(self) -> dict[str, float | int]:
        return {"epoch": self.epoch, "fallback_left": self.fallback_left, "num_fallbacks": self.num_fallbacks}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.epoch = float(state["epoch"])
        self.fallback_left = int(state["fallback_left"])
        self.num_fallbacks = int(state["num_fallbacks"])
