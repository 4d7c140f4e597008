"""ATM: attention-triggered mixture of experts over the seven HDM features (DeMo).

The E = 7 features (B, E, D) are cut into ``num_heads`` chunks of size ``c = D / num_heads``.
In every chunk h, expert e (``Linear(c, c) -> QuickGELU -> BatchNorm``) transforms chunk h of
feature e. Gate weights come from a cross-attention per chunk: the query is a projection of
the concatenated seven features (``Linear(7D, D) -> QuickGELU -> BatchNorm -> W_q``), the keys
are the seven features (``W_k``), ``gates = softmax(q_h . k_{e,h} / sqrt(c))`` over the experts.
Output: the gated expert outputs concatenated, (B, 7D), in DeMo's layout (expert-major, then
chunk). All 7 x num_heads experts run as one batched einsum.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (DeMo uses it in every new module)."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """Module form of :func:`quick_gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class AttentionTriggeredMoE(nn.Module):
    """``forward(feats (B, E, D)) -> (moe_feat (B, E*D), gates (B, num_heads, E))``."""

    def __init__(self, dim: int, num_experts: int = 7, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by MODEL.DEMO.HEAD={num_heads}")
        self.dim = dim
        self.num_experts = num_experts
        self.num_heads = num_heads
        c = dim // num_heads
        bound = 1.0 / math.sqrt(c)  # nn.Linear's default init range
        self.expert_weight = nn.Parameter(torch.empty(num_experts, num_heads, c, c).uniform_(-bound, bound))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, num_heads, c).uniform_(-bound, bound))
        self.expert_bn = nn.BatchNorm1d(num_experts * dim)  # per-channel, i.e. one BN per expert and chunk
        self.gate_reduce = nn.Sequential(nn.Linear(num_experts * dim, dim), QuickGELU(), nn.BatchNorm1d(dim))
        self.gate_q = nn.Linear(dim, dim, bias=False)
        self.gate_k = nn.Linear(dim, dim, bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, e, d = feats.shape
        h, c = self.num_heads, d // self.num_heads
        x = feats.reshape(b, e, h, c)
        y = torch.einsum("behi,ehoi->beho", x, self.expert_weight.to(x.dtype)) + self.expert_bias.to(x.dtype)
        y = self.expert_bn(quick_gelu(y).reshape(b, e * d)).reshape(b, e, h, c)
        q = self.gate_q(self.gate_reduce(feats.reshape(b, e * d))).reshape(b, h, c)
        k = self.gate_k(feats).reshape(b, e, h, c)
        gates = (torch.einsum("bhc,behc->bhe", q.float(), k.float()) * c**-0.5).softmax(dim=-1)  # (B, H, E)
        out = y * gates.transpose(1, 2).unsqueeze(-1).to(y.dtype)
        return out.reshape(b, e * d), gates
