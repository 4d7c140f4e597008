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
        # index tables of the batched forward, kept on the module's device (no host-to-device copy per step)
        containing = [[s for s, subset in enumerate(self.subsets) if m in subset] for m in range(num_modalities)]
        self._containing = containing  # (M, 4): the subsets that contain modality m (host lists)
        # slot of (subset s, modality m) among m's key/value slots: its place in containing[m], or, when m is not
        # in s, one of the zero slots after them (each (s, m) its own slot: the gather's backward adds nothing twice)
        missing = [[s for s, subset in enumerate(self.subsets) if m not in subset] for m in range(num_modalities)]
        slot = [[containing[m].index(s) if m in subset else len(containing[m]) + missing[m].index(s)
                 for m in range(num_modalities)] for s, subset in enumerate(self.subsets)]
        tables = {
            "member": [[m in subset for m in range(num_modalities)] for subset in self.subsets],  # (S, M)
            "slot": slot,  # (S, M)
            "modality": [list(range(num_modalities)) for _ in self.subsets],  # (S, M)
        }
        for name, table in tables.items():
            self.register_buffer(f"_{name}", torch.tensor(table), persistent=False)

    def forward(self, tokens: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (M, B, L, D) per-modality ``[global; patches]``, ``modality_mask`` (B, M) -> (B, 7, D).

        The seven attentions run batched: each modality's tokens are projected to the keys and values of
        the four subsets that contain it in one matmul, every subset attends over the slots of all three
        modalities with the slots outside it masked, and the seven output projections are one batched
        matmul. Same result as seven :class:`QueryAttention` calls on the concatenated subset tokens
        (``tests/test_demo_model.py``), in a few kernels instead of about two hundred.
        """
        num_mod, b, length, d = tokens.shape
        num_sub, first = len(self.subsets), self.queries[0]
        heads, head_dim = first.num_heads, d // first.num_heads
        member = self._member  # (S, M)
        slots = len(self._containing[0])
        # each modality's keys/values for the subsets that contain it, in one batched matmul
        # (a subset's weights appear under each of its modalities: slices and cat, not an indexed gather, so that
        # their gradients add up in a fixed order; an indexed gather's backward adds with CPU atomics)
        kv_weights = [[self.queries[s].in_proj_weight[d:] for s in row] for row in self._containing]
        kv_biases = [[self.queries[s].in_proj_bias[d:] for s in row] for row in self._containing]
        w_kv = torch.stack([torch.cat(row) for row in kv_weights])  # (M, slots * 2D, D)
        b_kv = torch.stack([torch.cat(row) for row in kv_biases])[:, None]  # (M, 1, slots * 2D)
        kv = torch.baddbmm(b_kv, tokens.reshape(num_mod, b * length, d), w_kv.transpose(1, 2))
        kv = kv.view(num_mod, b, length, slots, 2 * d)
        zeros = num_sub - slots  # one zero slot per subset that lacks the modality
        kv = torch.cat([kv, kv.new_zeros(num_mod, b, length, zeros, 2 * d)], dim=3)
        kv = kv[self._modality, :, :, self._slot]  # (S, M, B, L, 2D): subset s's keys/values of modality m
        kv = kv.permute(2, 0, 1, 3, 4).reshape(b, num_sub, num_mod * length, 2, heads, head_dim)
        k, v = (kv[:, :, :, i].permute(0, 1, 3, 2, 4).reshape(b, num_sub * heads, num_mod * length, head_dim)
                for i in (0, 1))
        queries = torch.stack([q.query for q in self.queries]).to(tokens.dtype)  # (S, D)
        w_q = torch.stack([q.in_proj_weight[:d] for q in self.queries])  # (S, D, D)
        b_q = torch.stack([q.in_proj_bias[:d] for q in self.queries])[:, None]  # (S, 1, D)
        q = torch.baddbmm(b_q, queries[:, None], w_q.transpose(1, 2))  # (S, 1, D)
        q = q.reshape(1, num_sub * heads, 1, head_dim).expand(b, -1, -1, -1)
        # keys a subset attends to: its modalities' tokens that are present (all of them when none is)
        attend = member[None] if modality_mask is None else member[None] & modality_mask[:, None, :].bool()
        none_left = ~attend.any(dim=2)  # (B, S)
        attend = attend | (none_left[:, :, None] & member[None])  # all-masked rows would give NaN
        key_mask = attend[:, :, None, :, None].expand(b, num_sub, heads, num_mod, length)
        key_mask = key_mask.reshape(b, num_sub * heads, 1, num_mod * length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                             dropout_p=first.dropout if self.training else 0.0)  # (B, S*H, 1, hd)
        out = out.reshape(b, num_sub, d).transpose(0, 1)  # (S, B, D)
        w_out = torch.stack([q.out_proj.weight for q in self.queries])  # (S, D, D)
        b_out = torch.stack([q.out_proj.bias for q in self.queries])[:, None]  # (S, 1, D)
        out = torch.baddbmm(b_out, out, w_out.transpose(1, 2)).transpose(0, 1)  # (B, S, D)
        return torch.where(none_left[..., None], self.null_features.to(out.dtype), out)
