"""ReID retrieval metrics (CMC, mAP, mINP) under the standard protocol, computed in torch in blocks.

Protocol (Market-1501 style, as the public ReID toolkits evaluate RGBNT201,
RGBNT100 and MSVR310): for each query, gallery entries with the same identity
*and* the same camera are removed; the remaining gallery is ranked by distance
(ties keep gallery order); queries whose remaining gallery has no true match
are skipped. For a query whose true matches sit at 0-based ranks
``r_1 < ... < r_m`` of its remaining gallery:

- CMC@k is 1 if ``r_1 < k`` (averaged over queries);
- AP = mean_i ``i / (r_i + 1)`` (precision at each hit);
- INP = ``m / (r_m + 1)`` (how much of the list must be read to find them all).

Everything runs on the device of the inputs, a block of queries at a time, so
a 100k gallery never needs a (Q, G) matrix in memory at once when features are
given (:func:`evaluate_reid_features`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.re_ranking import re_ranking  # noqa: F401  (importable from here too)

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else t


class _Accumulator:
    """Sums per-query CMC/AP/INP over blocks; finalises to fractions."""

    def __init__(self, max_rank: int, device: torch.device) -> None:
        self.max_rank = max_rank
        self.cmc = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap = torch.zeros((), dtype=torch.float64, device=device)
        self.inp = torch.zeros((), dtype=torch.float64, device=device)
        self.valid = torch.zeros((), dtype=torch.int64, device=device)
        self.query_ap: list[torch.Tensor] = []  # AP of each valid query, and its identity
        self.query_pid: list[torch.Tensor] = []

    def add(self, dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor,
            q_camids: torch.Tensor, g_camids: torch.Tensor) -> None:
        """Add a block: ``dist`` (b, G) for queries ``q_pids`` (b,) against the whole gallery."""
        order = torch.sort(dist, dim=1, stable=True).indices  # (b, G)
        pid_sorted, cam_sorted = g_pids[order], g_camids[order]
        match = pid_sorted == q_pids[:, None]
        keep = ~(match & (cam_sorted == q_camids[:, None]))
        hit = match & keep  # true matches that stay in the ranked list
        rank = torch.cumsum(keep, dim=1) - 1  # 0-based rank among kept entries
        num_hit = hit.sum(1)
        valid = num_hit > 0
        if not bool(valid.any()):
            return
        hit, rank, num_hit = hit[valid], rank[valid], num_hit[valid]
        hits_so_far = torch.cumsum(hit, dim=1)
        precision = torch.where(hit, hits_so_far.double() / (rank.double() + 1.0), 0.0)
        ap = precision.sum(1) / num_hit.double()
        self.ap += ap.sum()
        self.query_ap.append(ap)
        self.query_pid.append(q_pids[valid])
        big = torch.iinfo(rank.dtype).max
        first = torch.where(hit, rank, big).min(1).values
        last = torch.where(hit, rank, -1).max(1).values
        self.inp += (num_hit.double() / (last.double() + 1.0)).sum()
        ks = torch.arange(self.max_rank, device=dist.device)
        self.cmc += (first[:, None] <= ks[None, :]).double().sum(0)
        self.valid += valid.sum()

    def result(self) -> dict[str, Any]:
        n = int(self.valid)
        if n == 0:
            raise ValueError("no query has a valid match in the gallery (after removing same-id same-camera)")
        cmc = (self.cmc / n).float().cpu()
        return {
            "mAP": float(self.ap) / n,
            "mINP": float(self.inp) / n,
            "cmc": cmc,
            "rank1": float(cmc[0]),
            "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]),
            "num_valid_queries": n,
            "query_ap": torch.cat(self.query_ap).cpu(),  # (n,) AP of each valid query
            "query_pid": torch.cat(self.query_pid).cpu(),  # (n,) its identity
        }


def bootstrap_map_ci(query_ap: ArrayLike, query_pid: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mAP when the query identities are resampled with replacement.

    Queries of one identity move together (a cluster bootstrap): each of ``n_boot`` draws takes
    as many identities as there are, with replacement, and averages the AP of all their queries.
    The interval says how much mAP depends on which identities happen to be in the test split.
    """
    ap = np.asarray(query_ap, dtype=np.float64)
    ids, inverse = np.unique(np.asarray(query_pid), return_inverse=True)
    sum_ap = np.bincount(inverse, weights=ap, minlength=len(ids))
    count = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=n_boot)
    maps = (draws @ sum_ap) / (draws @ count)
    tail = (1.0 - level) / 2
    return float(np.quantile(maps, tail)), float(np.quantile(maps, 1.0 - tail))


def evaluate_reid(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    block_size: int = 1024,
) -> dict[str, Any]:
    """Standard ReID metrics from a (Q, G) distance matrix (smaller = more similar).

    Accepts numpy arrays or torch tensors (computed on ``distmat``'s device).
    Returns ``mAP``, ``mINP`` (fractions in [0, 1]), ``cmc`` (float tensor of
    length ``min(max_rank, G)``), convenience ``rank1/5/10`` and
    ``num_valid_queries``.
    """
    dist = _as_tensor(distmat)
    device = dist.device
    qp, gp = _as_tensor(q_pids, device).long(), _as_tensor(g_pids, device).long()
    qc, gc = _as_tensor(q_camids, device).long(), _as_tensor(g_camids, device).long()
    num_q, num_g = dist.shape
    if qp.numel() != num_q or qc.numel() != num_q or gp.numel() != num_g or gc.numel() != num_g:
        raise ValueError(
            f"distmat is {num_q}x{num_g} but got {qp.numel()} query pids, {qc.numel()} query camids, "
            f"{gp.numel()} gallery pids, {gc.numel()} gallery camids"
        )
    acc = _Accumulator(min(max_rank, num_g), device)
    for start in range(0, num_q, block_size):
        sl = slice(start, start + block_size)
        acc.add(dist[sl], qp[sl], gp, qc[sl], gc)
    return acc.result()


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G): squared Euclidean, or ``1 - cosine`` for ``metric='cosine'``."""
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        return 1.0 - F.normalize(qf, dim=1) @ F.normalize(gf, dim=1).t()
    if metric == "euclidean":
        dist = qf.pow(2).sum(1, keepdim=True) + gf.pow(2).sum(1)[None, :] - 2.0 * qf @ gf.t()
        return dist.clamp_min_(0.0)
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got '{metric}'")


def evaluate_reid_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    metric: str = "euclidean",
    max_rank: int = 50,
    block_size: int = 1024,
) -> dict[str, Any]:
    """Metrics from query/gallery features, computing distances one query block at a time.

    Memory is O(block_size * G) on the features' device instead of O(Q * G).
    """
    device = qf.device
    gf = gf.to(device)
    qp, gp = _as_tensor(q_pids, device).long(), _as_tensor(g_pids, device).long()
    qc, gc = _as_tensor(q_camids, device).long(), _as_tensor(g_camids, device).long()
    acc = _Accumulator(min(max_rank, gf.shape[0]), device)
    for start in range(0, qf.shape[0], block_size):
        sl = slice(start, start + block_size)
        acc.add(pairwise_distance(qf[sl], gf, metric), qp[sl], gp, qc[sl], gc)
    return acc.result()
