"""ATM: attention-triggered mixture of experts over the seven HDM features (DeMo).

The E = 7 features (B, E, D) are cut into ``num_heads`` chunks of size ``c = D / num_heads``.
In every chunk h, expert e (``Linear(c, c) -> QuickGELU -> BatchNorm``) transforms chunk h of
feature e. Gate weights come from a cross-attention per chunk: the query is a projection of
the concatenated seven features (``Linear(7D, D) -> QuickGELU -> BatchNorm -> W_q``), the keys
are the seven features (``W_k``), ``gates = softmax(q_h . k_{e,h} / sqrt(c))`` over the experts.
Output: the gated expert outputs concatenated, (B, 7D), in DeMo's layout (expert-major, then
chunk). All 7 x num_heads experts run as one batched einsum. The gate statistics come back
with the output (:class:`ATMOutput`) as detached 0-d tensors, with no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (DeMo uses it in every new module)."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """Module form of :func:`quick_gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


@dataclass
class ATMOutput:
    """What :class:`AttentionTriggeredMoE` returns.

    feat: (B, E*D) gated expert outputs, expert-major (DeMo's layout).
    gates: (B, num_heads, E) float32 gate weights, a softmax over the experts per chunk.
    stats: detached 0-d tensors (see :meth:`AttentionTriggeredMoE.forward`).
    """

    feat: torch.Tensor
    gates: torch.Tensor
    stats: dict[str, torch.Tensor]


class AttentionTriggeredMoE(nn.Module):
    """``forward(feats (B, E, D)) ->`` :class:`ATMOutput` ``(feat (B, E*D), gates (B, num_heads, E), stats)``.

    Args:
        dim: feature dimension D (divisible by ``num_heads``).
        num_experts: E, the number of input features (DeMo: the seven HDM subsets).
        num_heads: chunks per feature (DeMo ``MODEL.HEAD``).
        expert_names: one name per expert for the stat keys ``atm/gate_<name>`` (default ``"0"`` ..
            ``"E-1"``; DeMo passes the HDM subset names, e.g. ``RGB+NI``).
    """

    def __init__(self, dim: int, num_experts: int = 7, num_heads: int = 4,
                 expert_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by MODEL.DEMO.HEAD={num_heads}")
        names = tuple(expert_names) if expert_names is not None else tuple(str(e) for e in range(num_experts))
        if len(names) != num_experts:
            raise ValueError(f"{len(names)} expert names {names} for {num_experts} experts")
        self.expert_names = names
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

    def forward(self, feats: torch.Tensor) -> ATMOutput:
        """``feats`` (B, E, D) -> :class:`ATMOutput`.

        Stats (detached, 0-d): ``atm/gate_<name>`` (mean gate of each expert over samples and
        chunks), ``atm/gate_entropy`` (mean entropy in nats of the gates over the experts; the
        maximum is log E) and ``atm/gate_max`` (mean largest gate).
        """
        b, e, d = feats.shape
        h, c = self.num_heads, d // self.num_heads
        x = feats.reshape(b, e, h, c)
        y = torch.einsum("behi,ehoi->beho", x, self.expert_weight.to(x.dtype)) + self.expert_bias.to(x.dtype)
        y = self.expert_bn(quick_gelu(y).reshape(b, e * d)).reshape(b, e, h, c)
        q = self.gate_q(self.gate_reduce(feats.reshape(b, e * d))).reshape(b, h, c)
        k = self.gate_k(feats).reshape(b, e, h, c)
        gates = (torch.einsum("bhc,behc->bhe", q.float(), k.float()) * c**-0.5).softmax(dim=-1)  # (B, H, E)
        out = y * gates.transpose(1, 2).unsqueeze(-1).to(y.dtype)
        return ATMOutput(out.reshape(b, e * d), gates, self._stats(gates))

    @torch.no_grad()
    def _stats(self, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """gates (B, H, E) -> the gate statistics of :meth:`forward`."""
        stats: dict[str, torch.Tensor] = {}
        gd = gates.detach().float()
        g = gd.mean(dim=(0, 1))
        for i, name in enumerate(self.expert_names):
            stats[f"atm/gate_{name}"] = g[i]
        stats["atm/gate_entropy"] = -(gd * gd.clamp_min(1e-12).log()).sum(-1).mean()
        stats["atm/gate_max"] = gd.amax(-1).mean()
        return stats
