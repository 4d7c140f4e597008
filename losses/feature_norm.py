"""Feature-norm band regulariser: keep BN-feature norms inside a tolerance band.

Only the part of a norm outside ``[target - band, target + band]`` is penalised, with a
**squared hinge**: ``weight * mean_i relu(| ||f_i|| - target | - band)^2``. Squared
rather than linear so the penalty and its gradient are 0 at the band edge (no kink
for the optimiser to chatter on) and the pull grows with the distance: a norm of 20
(as seen in unstable ReID runs, 10 past the upper edge) is pulled 10x harder than one
just 1 outside.
"""

from __future__ import annotations

import torch

from .common import finish_stats
from .registry import LOSS_REGISTRY


def feature_norm_loss(
    features: torch.Tensor,
    target: float = 8.0,
    band: float = 2.0,
    weight: float = 5e-3,
    mask: torch.Tensor | None = None,
    host_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted squared-hinge penalty on L2 norms outside the band.

    Args:
        features: (B, D) features (any float dtype; norms in float32).
        target: centre of the band (8.0).
        band: half-width of the tolerance band (2.0): norms in [6, 10] cost nothing.
        weight: multiplier (5e-3; 1e-2 is the stricter setting), already applied.
        mask: optional (B,) booleans, True for rows to include (e.g. real modalities).

    Returns:
        loss: 0-d float32 ``weight * mean(relu(|norm - target| - band)^2)`` over the rows kept;
        stats: floats ``feat_norm_mean``, ``feat_norm_max``, ``feat_norm_outside``
            (fraction of rows outside the band) and ``feat_norm_penalty`` (unweighted).
    """
    if features.dim() != 2:
        raise ValueError(f"feature_norm_loss expects (B, D) features, got {tuple(features.shape)}")
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        norms = features.float().norm(dim=1)
        excess = (norms - target).abs() - band
        per_row = excess.clamp_min(0.0).pow(2)
        keep = torch.ones_like(norms) if mask is None else mask.reshape(-1).to(norms.device, norms.dtype)
        n = keep.sum().clamp_min(1.0)
        penalty = (per_row * keep).sum() / n
        loss = weight * penalty
        d_norms = norms.detach()
        stats = {
            "feat_norm_mean": (d_norms * keep).sum() / n,
            "feat_norm_max": (d_norms * keep).max(),
            "feat_norm_outside": ((excess.detach() > 0).float() * keep).sum() / n,
            "feat_norm_penalty": penalty.detach(),
        }
    return loss, finish_stats(stats, host_stats)


LOSS_REGISTRY.register("feature_norm")(feature_norm_loss)
