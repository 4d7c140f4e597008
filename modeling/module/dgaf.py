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
uniform gate rather than NaN. Returns the fused feature, ``w`` and ``c`` (the latter two for
statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from modeling.module.atm import QuickGELU


class DualGatedFusion(nn.Module):
    """``forward(feats (B, M, D), modality_mask (B, M) | None) -> (fused (B, D), w (B, M), c (B, M, D))``."""

    def __init__(self, dim: int, num_modalities: int = 3, hidden_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, 1))
        self.modality_bias = nn.Parameter(torch.zeros(num_modalities))
        self.channel_gate = nn.Linear(2 * dim, dim)
        for lin in (self.scorer[-1], self.channel_gate):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self, feats: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return fused, w, c
