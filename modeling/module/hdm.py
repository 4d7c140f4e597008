"""HDM: hierarchical decoupling of modality-specific and modality-shared features (DeMo).

Seven learnable query tokens -- R, N, T (modality-specific), RN, RT, NT, RNT (shared) -- each
attend with multi-head attention (``dim // 64`` heads, attention dropout 0.1 as DeMo) over the
concatenated ``[global; patches]`` tokens of the modalities in their subset, giving seven
decoupled features (B, 7, D). Attention runs through ``F.scaled_dot_product_attention``.

Missing modalities: their tokens are masked out of the keys of every subset that still has a
present modality; a subset that loses all its modalities returns a learned null feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The seven subsets of (RGB, NI, TI), as modality indices, in DeMo's order R, N, T, RN, RT, NT, RNT.
HDM_SUBSETS: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def subset_name(subset: Sequence[int], modalities: Sequence[str] = ("RGB", "NI", "TI")) -> str:
    """``(0, 1)`` -> ``'RGB+NI'``."""
    return "+".join(modalities[i] for i in subset)


class QueryAttention(nn.Module):
    """One learned query token attending over a key/value set (multi-head, SDPA, output projection).

    Same parameterisation as ``nn.MultiheadAttention`` (packed in-projection, xavier init, zero
    biases), with the query projected once per call and shared by the batch.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.query = nn.Parameter(dim**-0.5 * torch.randn(dim))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, keys: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``keys`` (B, L, D), ``key_mask`` (B, L) bool (True = attend) -> (B, D)."""
        b, length, d = keys.shape
        h = self.num_heads
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(self.query.to(keys.dtype), w_q, b_q).view(1, h, 1, d // h).expand(b, h, 1, d // h)
        kv = F.linear(keys, w_kv, b_kv).view(b, length, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, 1, d/H)
        return self.out_proj(out.reshape(b, d))


class HierarchicalDecoupling(nn.Module):
    """Seven subset queries over per-modality token sets -> (B, 7, D) decoupled features.

    Args:
        dim: token dimension D.
        num_heads: attention heads (default ``max(1, dim // 64)`` as DeMo).
        dropout: attention dropout (DeMo: 0.1).
        num_modalities: 3 (the subsets are those of :data:`HDM_SUBSETS`).
    """

    def __init__(self, dim: int, num_heads: int | None = None, dropout: float = 0.1, num_modalities: int = 3) -> None:
        super().__init__()
        if num_modalities != 3:
            raise ValueError("HDM is defined for three modalities (R, N, T)")
        heads = num_heads if num_heads is not None else max(1, dim // 64)
        self.subsets = HDM_SUBSETS
        self.queries = nn.ModuleList([QueryAttention(dim, heads, dropout) for _ in self.subsets])
        self.null_features = nn.Parameter(0.02 * torch.randn(len(self.subsets), dim))

    def forward(self, tokens: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (M, B, L, D) per-modality ``[global; patches]``, ``modality_mask`` (B, M) -> (B, 7, D)."""
        _, b, length, _ = tokens.shape
        outs = []
        for s, (subset, attn) in enumerate(zip(self.subsets, self.queries)):
            keys = tokens[subset[0]] if len(subset) == 1 else torch.cat([tokens[i] for i in subset], dim=1)
            if modality_mask is None:
                outs.append(attn(keys))
                continue
            present = modality_mask[:, list(subset)]  # (B, |S|)
            none_left = ~present.any(dim=1, keepdim=True)  # (B, 1)
            key_mask = present.repeat_interleave(length, dim=1) | none_left  # all-masked rows would give NaN
            out = attn(keys, key_mask)
            outs.append(torch.where(none_left, self.null_features[s].to(out.dtype), out))
        return torch.stack(outs, dim=1)
