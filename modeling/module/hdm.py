"""HDM: hierarchical decoupling of modality-specific and modality-shared features (DeMo).

Seven learnable query tokens -- R, N, T (modality-specific), RN, RT, NT, RNT (shared) -- each
attend with multi-head attention (``dim // 64`` heads, attention dropout 0.1 as DeMo) over the
concatenated ``[global; patches]`` tokens of the modalities in their subset, giving seven
decoupled features (B, 7, D). Attention runs through ``F.scaled_dot_product_attention``.

Missing modalities: their tokens are masked out of the keys of every subset that still has a
present modality; a subset that loses all its modalities returns a learned null feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.modalities import MODALITIES

#: The seven subsets of (RGB, NI, TI), as modality indices, in DeMo's order R, N, T, RN, RT, NT, RNT.
HDM_SUBSETS: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def subset_name(subset: Sequence[int], modalities: Sequence[str] = MODALITIES) -> str:
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
        self.register_buffer("_member", torch.tensor([[m in subset for m in range(num_modalities)]
                                                      for subset in self.subsets]), persistent=False)  # (S, M)

    def forward(self, tokens: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (M, B, L, D) per-modality ``[global; patches]``, ``modality_mask`` (B, M) -> (B, 7, D).

        One query per subset and head lets the attention skip the key and value projections of the tokens:
        ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``, and ``q . b_k`` is the same for every key, so it drops
        out of the softmax; ``sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + b_v sum_t p_t``. So the seven
        subsets' heads score all tokens with one matmul against ``W_k^T q``, pool the tokens with their
        probabilities in a second, and project the pooled tokens by ``W_v`` and ``out_proj`` per subset. No
        (token, subset) key or value tensor is ever made. Same result as seven :class:`QueryAttention` calls
        on the concatenated subset tokens (``tests/modeling/module/test_hdm.py``).
        """
        num_mod, b, length, d = tokens.shape
        num_sub, first = len(self.subsets), self.queries[0]
        heads, head_dim = first.num_heads, d // first.num_heads
        member = self._member  # (S, M)
        w_in = torch.stack([q.in_proj_weight for q in self.queries]).to(tokens.dtype)  # (S, 3D, D)
        b_in = torch.stack([q.in_proj_bias for q in self.queries]).to(tokens.dtype)  # (S, 3D)
        w_q, w_k, w_v = w_in.split(d, dim=1)
        b_q, b_v = b_in[:, :d], b_in[:, 2 * d:]
        queries = torch.stack([q.query for q in self.queries]).to(tokens.dtype)  # (S, D)
        q = torch.baddbmm(b_q[:, None], queries[:, None], w_q.transpose(1, 2))  # (S, 1, D): projected queries
        q = q.view(num_sub, heads, 1, head_dim) * head_dim**-0.5
        # W_k^T q per subset and head: the direction each (subset, head) scores a token along
        score_dirs = torch.matmul(q, w_k.view(num_sub, heads, head_dim, d)).reshape(num_sub * heads, d)
        x = tokens.permute(1, 0, 2, 3).reshape(b, num_mod * length, d)  # (B, M*L, D)
        logits = torch.matmul(x, score_dirs.t()).transpose(1, 2)  # (B, S*H, M*L)
        # keys a subset attends to: its modalities' tokens that are present (all of them when none is)
        attend = member[None] if modality_mask is None else member[None] & modality_mask[:, None, :].bool()
        none_left = ~attend.any(dim=2)  # (B, S)
        attend = attend | (none_left[:, :, None] & member[None])  # all-masked rows would give NaN
        key_mask = attend[:, :, None, :, None].expand(b, num_sub, heads, num_mod, length)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in float32 at least
        logits = logits.masked_fill(~key_mask.reshape(b, num_sub * heads, num_mod * length), -math.inf)
        probs = F.dropout(torch.softmax(logits, dim=-1), first.dropout, self.training)
        pooled = torch.matmul(probs.to(x.dtype), x)  # (B, S*H, D): the tokens averaged by each head's weights
        # W_v per head on its pooled tokens, plus b_v times the weights' sum (1 unless dropout dropped some);
        # one bmm over (subset, head) with the batch as rows: a broadcast matmul would copy W_v once per sample
        pooled = pooled.transpose(0, 1).reshape(num_sub * heads, b, d)  # (S*H, B, D)
        w_v_heads = w_v.reshape(num_sub * heads, head_dim, d).transpose(1, 2)  # (S*H, D, hd)
        values = torch.bmm(pooled, w_v_heads).view(num_sub, heads, b, head_dim).permute(0, 2, 1, 3)  # (S, B, H, hd)
        weight_sums = probs.sum(dim=-1).to(x.dtype).view(b, num_sub, heads, 1).transpose(0, 1)  # (S, B, H, 1)
        values = values + weight_sums * b_v.view(num_sub, 1, heads, head_dim)  # (S, B, H, hd)
        w_out = torch.stack([q.out_proj.weight for q in self.queries]).to(tokens.dtype)  # (S, D, D)
        b_out = torch.stack([q.out_proj.bias for q in self.queries]).to(tokens.dtype)[:, None]  # (S, 1, D)
        out = torch.baddbmm(b_out, values.reshape(num_sub, b, d), w_out.transpose(1, 2)).transpose(0, 1)
        return torch.where(none_left[..., None], self.null_features.to(out.dtype), out)
