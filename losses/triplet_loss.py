"""Batch-hard triplet loss (margin and soft-margin), DDP-safe.

For each anchor: the hardest positive (largest distance, same id) and the hardest
negative (smallest distance, other id) among *all* samples of the global batch.
Under DDP the candidates are gathered from every rank with
:func:`utils.distributed.all_gather_with_grad` (gradients flow back to the rank that
produced each feature) and the labels with ``all_gather_no_grad``; the anchors are the
local samples, so the loss averaged by DDP over ranks equals the single-process loss
on the concatenated batch. Identity in a single process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size

from .common import finish_stats
from .registry import LOSS_REGISTRY


def euclidean_dist(x: torch.Tensor, y: torch.Tensor, self_index: torch.Tensor | None = None) -> torch.Tensor:
    """(M, D), (N, D) -> (M, N) Euclidean distances, ``sqrt(clamp(d^2, 1e-12))`` (finite gradient at 0).

    ``self_index`` (M,): column of each row's own sample in ``y``; those entries are set to
    exactly 0 (the expanded ``|x|^2 + |y|^2 - 2 x.y`` leaves float32 round-off there,
    about 3e-4 after the square root).
    """
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    if self_index is not None:
        # a comparison, not an index_put_ of True: that would copy a host scalar to the device and wait for it
        is_self = self_index.unsqueeze(1) == torch.arange(y.shape[0], device=y.device).unsqueeze(0)
        d2 = d2.masked_fill(is_self, 0.0)
    return d2.clamp_min(1e-12).sqrt()


def _hardest_distances(
    x: torch.Tensor, pids: torch.Tensor, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining for the local anchors ``x`` (B, D) among all candidates (every rank's with ``gather``).

    Returns ``dist_ap`` (B,) (hardest positive), ``dist_an`` (B,) (hardest negative; ``dist_ap`` as a
    finite placeholder where there is none) and ``has_neg`` (B,) bool.
    """
    self_index = torch.arange(x.shape[0], device=x.device)
    if gather and get_world_size() > 1:
        cand, cand_pids = all_gather_with_grad(x), all_gather_no_grad(pids)
        self_index = self_index + get_rank() * x.shape[0]  # all ranks pass the same B
    else:
        cand, cand_pids = x, pids
    dist = euclidean_dist(x, cand, self_index)  # (B, N)
    is_pos = pids.unsqueeze(1) == cand_pids.unsqueeze(0)
    has_neg = (~is_pos).any(dim=1)
    dist_ap = dist.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    dist_an = dist.masked_fill(is_pos, float("inf")).amin(dim=1)
    dist_an = torch.where(has_neg, dist_an, dist_ap)  # finite placeholder, excluded from the loss
    return dist_ap, dist_an, has_neg


def triplet_loss(
    features: torch.Tensor,
    pids: torch.Tensor,
    margin: float = 0.3,
    soft_margin: bool = False,
    normalize_feature: bool = False,
    gather: bool = True,
    host_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch-hard triplet loss.

    Args:
        features: (B, D) local features (any float dtype; computed in float32).
        pids: (B,) identity labels.
        margin: hinge margin, ``relu(d_ap - d_an + margin)`` (ignored if ``soft_margin``).
        soft_margin: use ``softplus(d_ap - d_an)`` = ``log(1 + exp(d_ap - d_an))`` instead
            (no margin to tune; DeMo's choice).
        normalize_feature: L2-normalise the features first (distances in [0, 2]).
        gather: gather candidates across DDP ranks (no-op in a single process).

    The anchor itself counts as a positive at distance ~0, so an identity seen once
    still has ``d_ap = 0``. Anchors without any negative (a batch of one identity) are
    excluded; if none is left the loss is 0 with a gradient path.

    Returns:
        loss: 0-d float32 mean over the anchors kept;
        stats: floats ``triplet``, ``triplet_ap`` / ``triplet_an`` (mean hardest distances),
            ``triplet_active`` (fraction of anchors with ``d_an < d_ap + margin``; with
            soft margin ``d_an < d_ap``), ``triplet_anchors`` (anchors kept).
    """
    if features.dim() != 2:
        raise ValueError(f"triplet_loss expects (B, D) features, got {tuple(features.shape)}")
    pids = pids.reshape(-1).to(features.device)
    if pids.shape[0] != features.shape[0]:
        raise ValueError(f"pids has {pids.shape[0]} entries for {features.shape[0]} features")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = features.float()
        if normalize_feature:
            x = F.normalize(x, dim=1)
        dist_ap, dist_an, has_neg = _hardest_distances(x, pids, gather)
        gap = dist_ap - dist_an
        per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
        keep = has_neg.float()
        n = keep.sum()
        loss = (per_anchor * keep).sum() / n.clamp_min(1.0)
        active = (gap > 0) if soft_margin else (gap + margin > 0)
        nd = n.clamp_min(1.0)
        stats = {
            "triplet": loss.detach(),
            "triplet_ap": (dist_ap.detach() * keep).sum() / nd,
            "triplet_an": (dist_an.detach() * keep).sum() / nd,
            "triplet_active": (active.float() * keep).sum() / nd,
            "triplet_anchors": n,
        }
    return loss, finish_stats(stats, host_stats)


LOSS_REGISTRY.register("triplet")(triplet_loss)
