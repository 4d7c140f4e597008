"""DGAF: dual-gated adaptive fusion of the per-modality global features.

Replaces DeMo's plain concatenation ``[g_R, g_N, g_T]`` (B, 3D) by one fused feature (B, D)
that weighs modalities per sample and channels per modality:

1. **Modality gate** (which modality to trust for this sample). A shared scorer
   ``LayerNorm -> Linear(D, D/4) -> QuickGELU -> Linear(D/4, 1)`` plus a learned per-modality
   prior gives one logit per modality; missing modalities get ``-inf``; a softmax over the
   present ones gives ``w`` (B, M), summing to 1 over present modalities, 0 for missing ones.
   The scorer's last layer starts at zero, so ``w`` starts uniform over present modalities.
2. **Context** ``ctx = sum_m w_m g_m`` (B, D): the gated consensus of the present modalities.
3. **Channel gate** (which channels of each modality to trust over the consensus).
   ``c_m = sigmoid(Linear(2D, D)([g_m, ctx]))`` (B, M, D), per channel.
4. **Fusion** ``fused = sum_m w_m (c_m * g_m + (1 - c_m) * ctx) = ctx + sum_m w_m c_m (g_m - ctx)``.
   The channel-gate layer starts at zero (``c = 0.5``), so ``fused`` starts as ``ctx``, the
   modality-weighted mean; training moves each channel towards its own modality's evidence
   (``c -> 1``) or the consensus (``c -> 0``).

A missing modality has ``w_m = 0``, so neither its null feature nor its channel gate reaches
``fused``; a sample with no modality at all (not produced by the data) falls back to a
uniform gate rather than NaN. Returns a :class:`DGAFOutput`: the fused feature, ``w``, ``c``
and their statistics (detached 0-d tensors, no host synchronisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modeling.module.atm import QuickGELU
from utils.modalities import MODALITIES


@dataclass
class DGAFOutput:
    """What :class:`DualGatedFusion` returns.

    fused: (B, D) fused feature.
    weights: (B, M) float32 modality gate ``w`` (sums to 1 over the present modalities).
    channel_gates: (B, M, D) channel gate ``c`` in (0, 1).
    stats: detached 0-d tensors (see :meth:`DualGatedFusion.forward`).
    """

    fused: torch.Tensor
    weights: torch.Tensor
    channel_gates: torch.Tensor
    stats: dict[str, torch.Tensor]


class DualGatedFusion(nn.Module):
    """``forward(feats (B, M, D), modality_mask (B, M) | None) ->`` :class:`DGAFOutput`.

    Args:
        dim: feature dimension D.
        num_modalities: M.
        hidden_ratio: width of the modality scorer's hidden layer, as a fraction of D.
        modalities: the M modality names for the stat keys ``dgaf/weight_<name>`` (default
            :data:`utils.modalities.MODALITIES` when M is 3, else ``"0"`` .. ``"M-1"``).
    """

    def __init__(self, dim: int, num_modalities: int = 3, hidden_ratio: float = 0.25,
                 modalities: Sequence[str] | None = None) -> None:
        super().__init__()
        if modalities is None:
            modalities = MODALITIES if num_modalities == len(MODALITIES) else [str(m) for m in range(num_modalities)]
        if len(modalities) != num_modalities:
            raise ValueError(f"{len(modalities)} modality names {tuple(modalities)} for {num_modalities} modalities")
        self.modalities = tuple(modalities)
        hidden = max(1, int(dim * hidden_ratio))
        self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, 1))
        self.modality_bias = nn.Parameter(torch.zeros(num_modalities))
        self.channel_gate = nn.Linear(2 * dim, dim)
        for lin in (self.scorer[-1], self.channel_gate):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, feats: torch.Tensor, modality_mask: torch.Tensor | None = None) -> DGAFOutput:
        """``feats`` (B, M, D), ``modality_mask`` (B, M) bool or None (all present) -> :class:`DGAFOutput`.

        Stats (detached, 0-d): ``dgaf/weight_<m>`` (mean modality weight over the batch) and
        ``dgaf/channel_gate_mean`` (mean channel gate).
        """
        logits = self.scorer(feats).squeeze(-1).float() + self.modality_bias  # (B, M)
        if modality_mask is not None:
            logits = logits.masked_fill(~modality_mask, float("-inf"))
            logits = torch.where(modality_mask.any(dim=1, keepdim=True), logits, torch.zeros_like(logits))
        w = logits.softmax(dim=-1)
        wf = w.to(feats.dtype).unsqueeze(-1)  # (B, M, 1)
        ctx = (wf * feats).sum(dim=1)  # (B, D)
        ctx_m = ctx.unsqueeze(1).expand_as(feats)
        c = torch.sigmoid(self.channel_gate(torch.cat([feats, ctx_m], dim=-1)))  # (B, M, D)
        fused = ctx + (wf * c * (feats - ctx_m)).sum(dim=1)
        return DGAFOutput(fused, w, c, self._stats(w, c))

    @torch.no_grad()
    def _stats(self, w: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """w (B, M), c (B, M, D) -> the gate statistics of :meth:`forward`."""
        stats: dict[str, torch.Tensor] = {}
        wm = w.detach().mean(dim=0)
        for i, name in enumerate(self.modalities):
            stats[f"dgaf/weight_{name}"] = wm[i]
        stats["dgaf/channel_gate_mean"] = c.detach().float().mean()
        return stats
