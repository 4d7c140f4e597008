"""Attention bias from similarity weights with a bounded learnable scale.

``bias = clamp(weights * scale, -bias_clip, bias_clip)`` for weights in [-1, 1]
(e.g. cosine similarities). The scale is a :class:`BoundedScale` (default: log
parameterisation, clamp to [0.5, 5.0], warning past 4.0), and the output clip keeps
the bias where softmax is still sensitive: the two-way softmax derivative p(1 - p)
is 0.10 at a logit gap of 2, 0.05 at 3 and 0.007 at 5, so biases beyond +-5 only
saturate attention.
"""

from __future__ import annotations

import torch
from torch import nn

from .bounded_scale import BoundedScale, Constraint, Parameterization


class AttentionBiasGenerator(nn.Module):
    """Turns weights (..., N) in [-1, 1] into an additive attention bias (..., N).

    Args:
        bias_scale: initial scale (2.5).
        learnable_scale: learn the scale (else a fixed buffer).
        min_scale, max_scale: bounds of the scale (0.5, 5.0).
        warn_threshold: log a warning when the scale passes this (4.0).
        bias_clip: symmetric clip of the output bias (5.0).
        constraint, parameterization: forwarded to :class:`BoundedScale`.
        warn_every: forwarded to :class:`BoundedScale`.
    """

    def __init__(
        self,
        bias_scale: float = 2.5,
        learnable_scale: bool = True,
        min_scale: float = 0.5,
        max_scale: float = 5.0,
        warn_threshold: float | None = 4.0,
        bias_clip: float = 5.0,
        constraint: Constraint = "clamp",
        parameterization: Parameterization = "log",
        warn_every: int = 100,
    ) -> None:
        super().__init__()
        if bias_clip <= 0:
            raise ValueError(f"bias_clip must be > 0, got {bias_clip}")
        self.bias_clip = float(bias_clip)
        self.scale = BoundedScale(
            bias_scale,
            min_value=min_scale,
            max_value=max_scale,
            parameterization=parameterization,
            constraint=constraint,
            warn_threshold=warn_threshold,
            warn_every=warn_every,
            learnable=learnable_scale,
            name="attention_bias_scale",
        )

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """weights (..., N), expected in [-1, 1] -> bias (..., N) in [-bias_clip, bias_clip]."""
        return (weights * self.scale()).clamp(-self.bias_clip, self.bias_clip)

    def penalty(self) -> torch.Tensor:
        """The scale's penalty term (non-zero only with ``constraint='penalty'``)."""
        return self.scale.penalty()

    def stats(self, reset: bool = False) -> dict[str, float]:
        """``bias_scale`` (current value) and ``bias_scale_at_bound`` (fraction of calls at a bound)."""
        s = self.scale.stats(reset=reset)
        return {"bias_scale": s["value"], "bias_scale_at_bound": s["at_bound"]}
