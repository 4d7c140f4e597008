"""Similarity distribution matching (SDM) as a symmetric KL divergence, with modality masks.

SDM (from IRRA) aligns two sets of features of the same B samples (two modalities, or
two views) by matching, row by row, the softmax of their scaled cosine-similarity
matrix to the label distribution ``q = y / y.sum(1)``, ``y[i, j] = 1`` iff samples i
and j share an identity.

**KL direction.** Each direction is ``F.kl_div(log_p, q, reduction='none').sum(1)`` =
``KL(q || p) = sum_j q_j (log q_j - log p_j)``: the divergence *of the prediction from
the label distribution* (forward KL). Why this one:

* it needs no epsilon: ``q_j = 0`` terms are exactly 0 (``kl_div`` uses
  ``xlogy``), so the value is a true KL, >= 0 up to rounding, and 0 iff ``p == q``;
* its gradient w.r.t. the logits is ``(p - q) / temperature``, bounded, the same as a
  soft-target cross-entropy (they differ by the constant entropy of ``q``);
* it is mass-covering: every positive must receive probability, so with several
  positives per row (PK sampling) all of them are pulled, not just the easiest one.

**Differences from IRRA's ``compute_sdm``** (``model/objectives.py`` of IRRA, read for
reference): IRRA computes ``sum_j p_j (log p_j - log(q_j + 1e-8))`` = ``KL(p || q)``
(reverse KL, needs the epsilon; its value on negatives is set by ``-log 1e-8 = 18.4``);
it *sums* the image->text and text->image directions where we *average* them; it
builds ``q`` as ``labels / labels.sum(dim=1)``, which broadcasts the column sums and is
only right because its label matrix is symmetric (ours is not once masks remove rows
or columns, so we divide by the row sums explicitly); it uses a logit scale (e.g. 50)
where we use a temperature (``logits = cos / temperature``, 0.2 -> scale 5); it has no
masks, so every row has its diagonal positive. Both definitions are >= 0 and vanish
only when the predicted distributions equal the label distributions.

**Masks.** ``mask_a`` / ``mask_b`` (B,) say which rows of ``feat_a`` / ``feat_b`` are
real (a missing modality is a learned null token, not evidence). Only pairs whose
both sides are real enter: masked columns are removed from each row's softmax, masked
rows are dropped, and rows left without a positive are excluded from the mean. A batch
with no valid pair returns a 0 connected to the inputs' graph, never NaN. Masked rows
are replaced by zeros *before* normalisation, so even non-finite placeholder rows cannot
leak NaN into the loss or its gradients.

**Precision.** Normalisation, similarity, softmax and KL run in float32 with autocast
disabled, whatever the input dtype (fp16/bf16 features are upcast).

**Temperature.** :class:`losses.sdm_temperature.SDMTemperature` gives the schedule (0.20 -> 0.18, fallback 0.25
after a non-finite loss, clamped to [0.15, 0.5]). An "adaptive temperature from the
feature norm" is deliberately not offered: computed on the *normalised* features it is
``tau * 1.0``, a no-op; computed on the pre-normalisation norm (about 8 with the
feature-norm regulariser's target) it is ``0.2 * 8 = 1.6``, which the clamp pins to 0.5
on every step, i.e. a constant that silently overrides the schedule.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .common import finish_stats
from .registry import LOSS_REGISTRY

# Logit given to masked-out columns: far enough below any real logit (|cos / tau| <= 1 / 0.15 = 6.7
# in normal use) that exp() underflows to exactly 0 in float32, yet finite, so that
# ``0 * log_p`` stays 0 and fully masked rows give a finite (uniform) log-softmax.
_MASKED_LOGIT = -1.0e4


def _check_inputs(
    feat_a: torch.Tensor, feat_b: torch.Tensor, pids: torch.Tensor,
    mask_a: torch.Tensor | None, mask_b: torch.Tensor | None,
) -> None:
    if feat_a.dim() != 2 or feat_b.dim() != 2:
        raise ValueError(f"sdm_loss expects (B, D) features, got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}")
    if feat_a.shape != feat_b.shape:
        raise ValueError(f"feat_a {tuple(feat_a.shape)} and feat_b {tuple(feat_b.shape)} must have the same shape")
    b = feat_a.shape[0]
    if pids.reshape(-1).shape[0] != b:
        raise ValueError(f"pids has {pids.numel()} entries for a batch of {b}")
    for name, m in (("mask_a", mask_a), ("mask_b", mask_b)):
        if m is not None and m.reshape(-1).shape[0] != b:
            raise ValueError(f"{name} has {m.numel()} entries for a batch of {b}")


def _kl_rows(logits: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(q || softmax(logits)) for q = pos / pos.sum(-1).

    logits (..., B, B) float32 (masked columns already at ``_MASKED_LOGIT``), pos (..., B, B) float
    0/1 (positive AND valid). Returns kl (..., B), has_pos (..., B) bool, and the probability
    mass each row puts on its positives (..., B).
    """
    log_p = F.log_softmax(logits, dim=-1)
    n_pos = pos.sum(dim=-1)
    has_pos = n_pos > 0
    q = pos / n_pos.clamp_min(1.0).unsqueeze(-1)
    kl = F.kl_div(log_p, q, reduction="none").sum(dim=-1)
    pos_mass = (log_p.exp() * pos).sum(dim=-1)
    return kl, has_pos, pos_mass


def _masked_mean(values: torch.Tensor, keep: torch.Tensor, dims: int | tuple[int, ...]) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over ``keep`` along ``dims`` without a host sync (0 where nothing is kept)."""
    w = keep.to(values.dtype)
    n = w.sum(dim=dims)
    return (values * w).sum(dim=dims) / n.clamp_min(1.0), n


def _sdm_pairs(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    pids: torch.Tensor,
    temperature: float | torch.Tensor,
    mask_a: torch.Tensor | None,
    mask_b: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SDM of P pairs of views at once, with tensor stats (no host sync): ``feat_a``, ``feat_b`` (P, B, D),
    ``mask_a``, ``mask_b`` (P, B) bool or None; returns the loss (P,) and stats of shape (P,). Each pair is
    what :func:`sdm_loss` computes for it; batching them costs one set of kernels instead of P."""
    num_pairs, b = feat_a.shape[:2]
    device = feat_a.device
    pids = pids.reshape(-1).to(device)
    with torch.autocast(device_type=device.type, enabled=False):
        a = feat_a.float()
        bb = feat_b.float()
        all_real = torch.ones(num_pairs, b, dtype=torch.bool, device=device)
        ma = all_real if mask_a is None else mask_a.to(device).bool()
        mb = all_real if mask_b is None else mask_b.to(device).bool()
        if mask_a is not None:
            a = torch.where(ma.unsqueeze(-1), a, torch.zeros_like(a))
        if mask_b is not None:
            bb = torch.where(mb.unsqueeze(-1), bb, torch.zeros_like(bb))
        a = F.normalize(a, dim=-1, eps=1e-12)
        bb = F.normalize(bb, dim=-1, eps=1e-12)
        tau = temperature.float() if isinstance(temperature, torch.Tensor) else float(temperature)

        sim = torch.bmm(a, bb.transpose(1, 2))  # (P, B, B) cosine, rows: a, columns: b
        valid = ma.unsqueeze(2) & mb.unsqueeze(1)  # (P, B, B) both sides real
        pos = ((pids.unsqueeze(1) == pids.unsqueeze(0)) & valid).float()
        logits = sim / tau

        # a -> b: each real a-row against the real b-columns.
        kl_ab, has_ab, mass_ab = _kl_rows(logits.masked_fill(~valid, _MASKED_LOGIT), pos)
        # b -> a: each real b-row (column of sim) against the real a-rows.
        valid_t = valid.transpose(1, 2)
        kl_ba, has_ba, mass_ba = _kl_rows(logits.transpose(1, 2).masked_fill(~valid_t, _MASKED_LOGIT),
                                          pos.transpose(1, 2))

        loss_ab, n_ab = _masked_mean(kl_ab, has_ab, -1)
        loss_ba, n_ba = _masked_mean(kl_ba, has_ba, -1)
        # With no valid row both means are an exact 0 that is still a function of the
        # inputs (through sim), so backward() works and gives zero gradients.
        loss = 0.5 * (loss_ab + loss_ba)

        is_pos = pos.bool()
        every = (1, 2)
        stats = {
            "sdm": loss.detach(),
            "sdm_pos_cos": _masked_mean(sim.detach(), is_pos, every)[0],
            "sdm_neg_cos": _masked_mean(sim.detach(), valid & ~is_pos, every)[0],
            "sdm_a2b": loss_ab.detach(),
            "sdm_b2a": loss_ba.detach(),
            "sdm_valid_rows": n_ab.detach(),
            "sdm_valid_pairs": valid.float().sum(dim=every),
            "sdm_pos_prob": _masked_mean(mass_ab.detach(), has_ab, -1)[0],
            "sdm_temperature": tau.detach() if isinstance(tau, torch.Tensor) else tau,
        }
    return loss, stats


def sdm_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    pids: torch.Tensor,
    temperature: float | torch.Tensor = 0.2,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    host_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric SDM loss between two views of the same B samples.

    Args:
        feat_a, feat_b: (B, D) features of the two views/modalities (any float dtype;
            computed in float32, L2-normalised inside).
        pids: (B,) identity labels; ``y[i, j] = pids[i] == pids[j]``.
        temperature: softmax temperature (``logits = cos / temperature``), a float or 0-d tensor.
        mask_a, mask_b: optional (B,) booleans, True where the row is a real sample of
            that view. Only pairs with both sides real take part.

    Returns:
        loss: 0-d float32, ``0.5 * (mean_rows KL(q || p)_{a->b} + mean_rows KL(q || p)_{b->a})``
            over rows that have at least one valid positive; >= 0, never NaN.
        stats: floats ``sdm``, ``sdm_a2b``, ``sdm_b2a``, ``sdm_valid_rows`` (count of a->b rows
            used), ``sdm_valid_pairs``, ``sdm_pos_prob`` (mean softmax mass on positives,
            a->b; 1.0 = perfect), ``sdm_temperature``. One host transfer per call, none with
            ``host_stats=False`` (detached device tensors instead).
    """
    _check_inputs(feat_a, feat_b, pids, mask_a, mask_b)
    one = [None if m is None else m.reshape(1, -1) for m in (mask_a, mask_b)]  # one pair of the batched core
    loss, stats = _sdm_pairs(feat_a.unsqueeze(0), feat_b.unsqueeze(0), pids, temperature, *one)
    stats = {k: v[0] if isinstance(v, torch.Tensor) and v.dim() == 1 else v for k, v in stats.items()}
    return loss[0], finish_stats(stats, host_stats)


LOSS_REGISTRY.register("sdm")(sdm_loss)


def sdm_loss_legacy(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    pids: torch.Tensor,
    temperature: float | torch.Tensor = 0.2,
    host_stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ``ce - h`` formula that :func:`sdm_loss` corrects, for the ablation rows only.

    ``ce - h`` with ``ce = -sum_j P_j log max(q_j, eps)`` and ``h = -sum_j P_j log P_j`` against
    the eps-clamped label distribution: not a KL divergence (q is not renormalised after the
    clamp), so it goes negative near convergence; it has no masks, so placeholder features
    of missing modalities are aligned like real ones. Do not train with it except to
    reproduce the ablation rows labelled "old formula" (``LOSS.SDM.FORMULA legacy``;
    docs/decisions.md).
    """
    eps = 1e-6
    with torch.autocast(device_type=feat_a.device.type, enabled=False):
        a = F.normalize(feat_a.float(), dim=1, eps=eps)
        b = F.normalize(feat_b.float(), dim=1, eps=eps)
        s = a @ b.t() / temperature
        y = (pids.reshape(-1, 1) == pids.reshape(1, -1)).float()

        def one_direction(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            p, log_p = F.softmax(s, dim=1), F.log_softmax(s, dim=1)
            q = (y / y.sum(1, keepdim=True).clamp_min(1)).clamp_min(eps)
            return (-(p * torch.log(q)).sum(1) + (p * log_p).sum(1)).mean()

        loss = 0.5 * (one_direction(s, y) + one_direction(s.t(), y.t()))
    return loss, finish_stats({"sdm": loss.detach()}, host_stats)


LOSS_REGISTRY.register("sdm_legacy")(sdm_loss_legacy)


def center_features(feat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``feat`` (B, D) minus its mean over the real rows (``mask`` (B,) bool; ``None``: all rows).

    Features that share one dominant direction (every sample of a modality at cosine ~1 to
    every other) give SDM a uniform softmax and nothing to learn from; what tells identities
    apart is the deviation from the batch mean, which centring keeps. Masked rows are left as
    they are (SDM ignores them). Gradients flow through the mean, as through BatchNorm.
    """
    keep = torch.ones(feat.shape[0], dtype=torch.bool, device=feat.device) if mask is None else mask.bool()
    w = keep.to(feat.dtype).unsqueeze(1)
    mean = (feat * w).sum(0, keepdim=True) / w.sum().clamp_min(1.0)
    return torch.where(keep.unsqueeze(1), feat - mean, feat)


def _modality_pairs(
    features: Mapping[str, torch.Tensor],
    modality_mask: torch.Tensor | None,
    modality_order: Sequence[str] | None,
    pairs: Sequence[tuple[str, str]] | None,
) -> tuple[list[str], Sequence[tuple[str, str]]]:
    """The mask's column names and the pairs to align (every unordered pair by default), checked."""
    order = list(modality_order) if modality_order is not None else list(features)
    missing = [m for m in order if m not in features]
    if missing:
        raise KeyError(f"modality_order names {missing} but features has {sorted(features)}")
    if modality_mask is not None and modality_mask.shape[-1] != len(order):
        raise ValueError(f"modality_mask has {modality_mask.shape[-1]} columns for modalities {order}")
    if pairs is None:
        pairs = list(itertools.combinations(order, 2))
    if not pairs:
        raise ValueError(f"need at least two modalities for SDM, got {order}")
    return order, pairs


def _mean_over_used_pairs(
    pair_loss: torch.Tensor, s: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean of the (P,) pair losses over the pairs with a valid positive, and the tensor stats of
    :func:`sdm_multimodal` (``s``: :func:`_sdm_pairs`' per-pair stats)."""
    used = (s["sdm_valid_rows"] > 0).float()  # (P,): pairs with at least one valid positive
    n_used = used.sum()
    total = (pair_loss * used).sum()
    pos_cos = (s["sdm_pos_cos"] * used).sum()
    neg_cos = (s["sdm_neg_cos"] * used).sum()
    tstats: dict[str, Any] = {f"sdm_{m}_{n}": s["sdm"][i] for i, (m, n) in enumerate(pairs)}
    loss = total / n_used.clamp_min(1.0)
    tstats = {"sdm": loss.detach(), "sdm_pairs_used": n_used, "sdm_pos_cos": pos_cos / n_used.clamp_min(1.0),
              "sdm_neg_cos": neg_cos / n_used.clamp_min(1.0), **tstats}
    return loss, tstats


def sdm_multimodal(
    features: Mapping[str, torch.Tensor],
    pids: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    modality_order: Sequence[str] | None = None,
    temperature: float | torch.Tensor = 0.2,
    pairs: Sequence[tuple[str, str]] | None = None,
    host_stats: bool = True,
    center: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SDM averaged over modality pairs, masking missing modalities.

    Args:
        features: modality name -> (B, D) features (e.g. ``{"RGB": ..., "NI": ..., "TI": ...}``).
        pids: (B,) identity labels.
        modality_mask: optional (B, M) booleans (the batch's ``feature_masks``), column m
            for ``modality_order[m]``; True where that modality is real.
        modality_order: names for the mask's columns (default: ``features``' key order).
        temperature: as in :func:`sdm_loss`.
        pairs: modality pairs to align (default: every unordered pair).
        center: subtract each modality's batch mean (over its real rows) first
            (:func:`center_features`).

    Returns:
        loss: mean of :func:`sdm_loss` over the pairs that have at least one valid
            positive pair (0 with a gradient path if none has), no host sync to decide;
        stats: floats ``sdm`` (the loss), ``sdm_pairs_used``, ``sdm_<m>_<n>`` per pair, and
            ``sdm_pos_cos`` / ``sdm_neg_cos``, the mean cross-modal cosine of same-identity /
            other-identity pairs (over the pairs used).
    """
    order, pairs = _modality_pairs(features, modality_mask, modality_order, pairs)
    index = {m: i for i, m in enumerate(order)}
    if center:
        features = {m: center_features(features[m], None if modality_mask is None else modality_mask[:, index[m]])
                    for m in order}
    for m, n in pairs:  # shapes checked per pair, as sdm_loss would
        _check_inputs(features[m], features[n], pids, None, None)
    if modality_mask is not None and modality_mask.shape[0] != features[order[0]].shape[0]:
        raise ValueError(f"modality_mask has {modality_mask.shape[0]} rows for a batch of "
                         f"{features[order[0]].shape[0]}")
    stacked = [torch.stack([features[pair[side]].float() for pair in pairs]) for side in (0, 1)]  # (P, B, D)
    masks = [None if modality_mask is None else torch.stack([modality_mask[:, index[pair[side]]] for pair in pairs])
             for side in (0, 1)]  # (P, B)
    pair_loss, s = _sdm_pairs(stacked[0], stacked[1], pids, temperature, masks[0], masks[1])
    loss, tstats = _mean_over_used_pairs(pair_loss, s, pairs)
    return loss, finish_stats(tstats, host_stats)


LOSS_REGISTRY.register("sdm_multimodal")(sdm_multimodal)
