"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), as the published DeMo / TransReID code computes it.

Same algorithm and the same numbers as that code's ``re_ranking`` (``utils/reranking.py``):
squared Euclidean distances, each row scaled by its maximum; the k-reciprocal neighbours of every
sample, expanded by the half-size reciprocal sets of their members that overlap them by more than
2/3; Gaussian weights ``exp(-d)`` normalised per row; local query expansion over the ``k2`` nearest
rows; Jaccard distance ``1 - inter / (2 - inter)`` with ``inter = sum_j min(V[q, j], V[g, j])``; and
``(1 - lambda) * jaccard + lambda * distance``. Two things differ, both in how, not what:

* **Memory.** The reference holds four (N, N) arrays (N = queries + gallery). Here the weight
  vectors are kept sparse (each row has at most ``(k1 + 1)(k1 / 2 + 1)`` entries before query
  expansion), distances are computed ``block_size`` rows at a time, and the Jaccard overlap is
  accumulated through an inverted index; peak memory is O(N * (k1 * k1/2 * k2 + block_size)).
* **Precision.** The reference stores the weights and the Jaccard distance in float16; here they
  stay float32 (the results agree to float16 rounding, ~1e-3).
"""

from __future__ import annotations

import torch


def _merge_sorted_duplicates(ids: torch.Tensor, values: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, sum the values of equal ids: ``ids`` (R, M) with ``sentinel`` for empty slots. Returns
    ids and values (R, M) with each id once (the rest ``sentinel`` / 0)."""
    ids, order = ids.sort(dim=1)
    values = values.gather(1, order)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = new.long().cumsum(1) - 1  # the slot of each entry's id
    out_ids = torch.full_like(ids, sentinel).scatter(1, slot, ids)
    out_values = torch.zeros_like(values).scatter_add(1, slot, values)
    out_values = torch.where(out_ids == sentinel, torch.zeros_like(out_values), out_values)
    return out_ids, out_values


def _trim(ids: torch.Tensor, values: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are empty in every row (merged ids come first in each row)."""
    keep = max(1, int((ids != sentinel).sum(1).max()))
    return ids[:, :keep], values[:, :keep]


def _pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`engine.evaluation.pairwise_distance`, imported on use (engine.evaluation re-exports this module's
    re_ranking)."""
    from engine.evaluation import pairwise_distance

    return pairwise_distance(x, y)


def re_ranking(qf: torch.Tensor, gf: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               block_size: int = 4096, max_pairs: int = 2**25) -> torch.Tensor:
    """Re-ranked (Q, G) distances of queries ``qf`` (Q, D) to gallery ``gf`` (G, D), on their device.

    ``k1``: size of the k-reciprocal neighbourhoods (DeMo uses 50), ``k2``: query-expansion
    neighbours (DeMo: 15; 1 = none), ``lambda_value``: weight of the original distance. Features
    are used as given (normalise them first if the retrieval does, as DeMo's evaluator does).
    ``block_size`` rows of distances and ``max_pairs`` Jaccard terms are held at a time.
    """
    if k2 < 1 or k2 > k1 + 1:
        raise ValueError(f"re-ranking needs 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}")
    feats = torch.cat([qf, gf]).float()
    n, num_q = feats.shape[0], qf.shape[0]
    k1 = min(k1, n - 1)
    half = min(int(round(k1 / 2)), n - 1)
    sentinel = n  # the id of an empty slot in the sparse rows below

    scale, topk1 = _scaled_neighbours(feats, k1, block_size)
    ids = _reciprocal_neighbours(topk1, half, sentinel)
    ids, w = _neighbour_weights(feats, ids, scale, sentinel, block_size)
    if k2 != 1:  # local query expansion: each row becomes the mean of its k2 nearest rows' weights
        near = topk1[:, :k2]
        ids, w = _trim(*_merge_sorted_duplicates(ids[near].flatten(1), w[near].flatten(1) / k2, sentinel), sentinel)
    return _jaccard_distances(feats, num_q, ids, w, scale, sentinel, lambda_value, block_size, max_pairs)


def _scaled_neighbours(feats: torch.Tensor, k1: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum distance (the reference scales row i by it), (N,), and its ``k1 + 1`` nearest rows
    (itself first), (N, k1 + 1); ``feats`` (N, D), distances ``block_size`` rows at a time."""
    n, device = feats.shape[0], feats.device
    scale = torch.empty(n, device=device)
    topk1 = torch.empty(n, k1 + 1, dtype=torch.long, device=device)
    for start in range(0, n, block_size):
        d = _pairwise_distance(feats[start:start + block_size], feats)
        scale[start:start + block_size] = d.amax(1)
        topk1[start:start + block_size] = d.topk(k1 + 1, dim=1, largest=False, sorted=True).indices
    return scale.clamp_min(1e-12), topk1


def _reciprocal_neighbours(topk1: torch.Tensor, half: int, sentinel: int) -> torch.Tensor:
    """Each row's k-reciprocal set, expanded: (N, M) ids with repeats, ``sentinel`` in empty slots.

    The k-reciprocal set of i is ``{j in topk1[i] : i in topk1[j]}``; a member c adds its half-size
    reciprocal set when more than 2/3 of that set lies in i's own reciprocal set.
    """
    n, device = topk1.shape[0], topk1.device
    k1 = topk1.shape[1] - 1
    topkh = topk1[:, : half + 1]
    rows = torch.arange(n, device=device)
    recip = (topk1[topk1] == rows[:, None, None]).any(-1)  # (N, k1 + 1)
    recip_h = (topkh[topkh] == rows[:, None, None]).any(-1)  # (N, half + 1)
    own = torch.where(recip, topk1, torch.full_like(topk1, sentinel))  # (N, k1 + 1)
    cand_sets = torch.where(recip_h[topk1], topkh[topk1], torch.full_like(topk1[..., None].expand(-1, -1, half + 1),
                                                                          sentinel))  # (N, k1 + 1, half + 1)
    inside = torch.zeros(cand_sets.shape, dtype=torch.bool, device=device)
    for a in range(k1 + 1):  # membership of every candidate-set element in the row's set, one column at a time
        inside |= cand_sets == own[:, a, None, None]
    inside &= cand_sets != sentinel
    size = (cand_sets != sentinel).sum(-1)
    take = recip & (inside.sum(-1) > 2.0 / 3.0 * size)
    expanded = torch.where(take[..., None], cand_sets, torch.full_like(cand_sets, sentinel)).flatten(1)
    return torch.cat([own, expanded], dim=1)


def _neighbour_weights(feats: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor, sentinel: int,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``exp(-d / scale)`` over each row's unique ``ids``, normalised per row (distances again, a
    block at a time). Returns the merged ids and their weights, both (N, M')."""
    n, device = feats.shape[0], feats.device
    ids, _ = _trim(*_merge_sorted_duplicates(ids, torch.zeros(ids.shape, device=device), sentinel), sentinel)
    valid = ids != sentinel
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    w = torch.zeros(ids.shape, device=device)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        d = _pairwise_distance(feats[start:stop], feats).gather(1, safe[start:stop])
        w[start:stop] = torch.where(valid[start:stop], torch.exp(-d / scale[start:stop, None]), 0.0)
    return ids, w / w.sum(1, keepdim=True)


def _query_blocks(pairs: list[int], block_size: int, max_pairs: int) -> list[tuple[int, int]]:
    """``(start, stop)`` query ranges of at most ``block_size`` queries holding at most ``max_pairs`` Jaccard terms
    (``pairs``: the terms of each query; a query with more than ``max_pairs`` gets a block of its own)."""
    bounds, start, total = [], 0, 0
    for i, p in enumerate(pairs):
        if i > start and (total + p > max_pairs or i - start >= block_size):
            bounds.append((start, i))
            start, total = i, 0
        total += p
    bounds.append((start, len(pairs)))
    return bounds


def _jaccard_distances(feats: torch.Tensor, num_q: int, ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                       sentinel: int, lambda_value: float, block_size: int, max_pairs: int) -> torch.Tensor:
    """``(1 - lambda) * jaccard + lambda * distance`` of every query with every gallery sample, (Q, G).

    The Jaccard overlap ``sum_j min(V[q, j], V[g, j])`` of the sparse rows ``ids``, ``w`` (N, M) is
    accumulated through an inverted index over the columns, a block of queries at a time.
    """
    n, device = feats.shape[0], feats.device
    rows = torch.arange(n, device=device)
    valid = ids != sentinel
    col = ids[valid]  # column of each non-zero
    owner = rows[:, None].expand_as(ids)[valid]
    val = w[valid]
    order = col.argsort()
    col, owner, val = col[order], owner[order], val[order]
    starts = torch.searchsorted(col, torch.arange(n + 1, device=device))
    counts = starts[1:] - starts[:-1]
    final = torch.empty(num_q, n - num_q, device=device)
    q_ids, q_w = ids[:num_q], w[:num_q]
    q_valid = q_ids != sentinel
    pairs = torch.where(q_valid, counts[torch.where(q_valid, q_ids, 0)], 0).sum(1)  # per query
    for start, stop in _query_blocks(pairs.tolist(), block_size, max_pairs):
        qi, qj = (q_ids[start:stop] != sentinel).nonzero(as_tuple=True)
        cols = q_ids[start:stop][qi, qj]
        reps = counts[cols]
        # one entry per (query non-zero, row with a non-zero in the same column)
        pair = torch.arange(len(cols), device=device).repeat_interleave(reps)
        at = starts[cols][pair] + torch.arange(len(pair), device=device) - (reps.cumsum(0) - reps)[pair]
        overlap = torch.minimum(q_w[start:stop][qi, qj][pair], val[at])
        inter = torch.zeros(stop - start, n, device=device)
        inter.index_put_((qi[pair], owner[at]), overlap, accumulate=True)
        jaccard = 1.0 - inter / (2.0 - inter)
        dist = _pairwise_distance(feats[start:stop], feats) / scale[start:stop, None]
        final[start:stop] = ((1.0 - lambda_value) * jaccard + lambda_value * dist)[:, num_q:]
    return final
