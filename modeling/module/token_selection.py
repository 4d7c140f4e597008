"""SDTPS: token selection scored by a cosine-gated cross-modal attention.

Each modality m in (RGB, NI, TI) has a class token ``g_m`` (B, D) and patch tokens
``P_m`` (B, N, D). For every ordered pair (q, p) a :class:`CrossModalAttention` lets ``g_q``
attend over ``P_p``; its gated attention averaged over heads is a per-patch score of ``P_p``
(q = p: the modality's own self-attention score ``s_im``; q != p: the cross-modal scores
``s_m2``, ``s_m3``). :class:`TokenSparse` averages the three,

    score_p = (s_im + s_m2 + s_m3) / 3        (missing modalities q left out of the average),

keeps the top ``ceil(keep_ratio * N)`` patches (``keep_policy = indices[:, :num_keep]``) and
merges the rest into one extra token, their score-weighted mean, so no patch is dropped
outright. :class:`SDTPS` runs the nine attentions and the selection for all modalities.

Three configurations of the gate:

* default: ``use_gate_norm=False, renormalize_attn=False`` (fixed N, ranking only);
* stable: ``use_gate_norm=True`` (LayerNorm of the gate logits over heads; variable N);
* strictly probabilistic: ``renormalize_attn=True`` (gated rows re-normalised to sum 1).

:class:`SDTPS` computes the nine attentions and the three selections batched over modality pairs
(a few dozen kernels instead of several hundred; the eager training step is bound by kernel
launches), with the same formulas as nine :class:`CrossModalAttention` calls, which stay the
parameter containers and the per-pair reference. No host synchronisation happens in ``forward``;
statistics come back as detached 0-d tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.modalities import MODALITIES

#: Renormalisation epsilon: ``attn_gated / (attn_gated.sum(-1, keepdim=True) + 1e-8)``.
RENORM_EPS = 1e-8


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: the scores are computed in float32 under bf16/fp16 autocast (and in float64
    when the module runs in float64, e.g. against a reference)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class CrossModalAttention(nn.Module):
    """Per-head attention of one modality's global token over another's patches, cosine-gated.

    For global ``g`` (B, D) and patches ``P`` (B, N, D), with ``H`` heads of size ``d = D / H``::

        attn        = softmax(q_h(g) . k_h(P)^T / sqrt(d))                  (B, H, N), over N
        cosine      = cos(P[..., h-th chunk], g[..., h-th chunk])           (B, H, N), in [-1, 1]
        gate_logits = gate_scale[h] * cosine + gate_bias[h]                 (B, H, N)
        [use_gate_norm]    gate_logits = LayerNorm over the H heads of each (b, n)
        gate        = sigmoid(gate_logits)
        attn_gated  = attn * gate
        [renormalize_attn] attn_gated = attn_gated / (attn_gated.sum(-1, keepdim=True) + 1e-8)

    The cosine is taken per head on the *un-projected* features split into the heads' channel
    chunks: a fixed semantic prior (how much the patch looks like the global token in that
    channel group) that the learned projections cannot drift, while gradients still reach
    both token sets through it, and reach ``gate_scale``, ``gate_bias`` and the Q/K projections.

    ``gate_scale`` and ``gate_bias`` are plain per-head ``nn.Parameter`` s (init 0.5 / 0.5, so
    the gate starts in [sigmoid(0), sigmoid(1)] = [0.50, 0.73] and does not suppress unrelated
    patches before anything is learned, as 1.0 / 0.0 would with [0.27, 0.73]; see
    docs/decisions.md), clamped in the forward to ``[-param_bound, param_bound]`` (default 5:
    past it the sigmoid's derivative p(1 - p) is below 0.007). Why not the shared
    ``BoundedScale``: (1) the gate cannot run the softmax into saturation, the failure
    ``BoundedScale`` guards against -- it multiplies a bounded cosine and its sigmoid output
    only attenuates softmax weights that are already computed, so a large scale saturates the
    sigmoid (which the clamp prevents) but never sharpens the softmax; (2) the values may
    legitimately be negative (an inverted gate) or cross zero, which ``BoundedScale``'s log /
    positive parameterisations exclude; (3) ``BoundedScale.forward`` mutates counters on every
    call, which would make ``torch.compile`` re-guard this hot path each step, and its stats are
    host-synced floats, while this model returns tensors. The learned values are returned as
    stats by :class:`SDTPS`, and both go in the no-weight-decay group (1-D parameters), so
    weight decay does not pull the gate to sigmoid(0) = 0.5.

    ``forward`` returns ``(attn_gated, gate)``, both (B, H, N) in float32. This attention needs
    its weights (they are the scores), so it is an explicit softmax, not SDPA.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        num_heads: int = 4,
        use_gate_norm: bool = False,
        renormalize_attn: bool = False,
        init_scale: float = 0.5,
        init_bias: float = 0.5,
        qkv_bias: bool = True,
        param_bound: float = 5.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not abs(init_scale) <= param_bound or not abs(init_bias) <= param_bound:
            raise ValueError(f"gate init scale/bias ({init_scale}, {init_bias}) outside [-{param_bound}, {param_bound}]")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.use_gate_norm = use_gate_norm
        self.renormalize_attn = renormalize_attn
        self.param_bound = float(param_bound)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.gate_scale = nn.Parameter(torch.full((num_heads,), float(init_scale)))
        self.gate_bias = nn.Parameter(torch.full((num_heads,), float(init_bias)))
        self.gate_norm = nn.LayerNorm(num_heads) if use_gate_norm else None
        for lin in (self.q_proj, self.k_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective per-head ``(gate_scale, gate_bias)``, each (H,), clamped to the bound."""
        b = self.param_bound
        return self.gate_scale.clamp(-b, b), self.gate_bias.clamp(-b, b)

    def head_cosine(self, global_feat: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Per-head cosine of ``patches`` (B, N, D) with ``global_feat`` (B, D) -> (B, H, N)."""
        b, n, _ = patches.shape
        g = F.normalize(_fp32(global_feat).reshape(b, self.num_heads, self.head_dim), dim=-1)
        p = F.normalize(_fp32(patches).reshape(b, n, self.num_heads, self.head_dim), dim=-1)
        return torch.einsum("bhd,bnhd->bhn", g, p)

    def gate_from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        """``sigmoid([LN](gate_scale * cosine + gate_bias))`` for ``cosine`` (B, H, N) -> (B, H, N)."""
        scale, bias = self.scale_and_bias()
        logits = cosine * scale.view(1, -1, 1) + bias.view(1, -1, 1)
        if self.gate_norm is not None:
            logits = self.gate_norm(logits.transpose(1, 2)).transpose(1, 2)  # LN over heads
        return torch.sigmoid(logits)

    def attention(self, global_feat: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Un-gated ``softmax(QK^T / sqrt(d))`` over the N patches -> (B, H, N), float32."""
        b, n, _ = patches.shape
        q = self.q_proj(global_feat).reshape(b, self.num_heads, self.head_dim)
        k = self.k_proj(patches).reshape(b, n, self.num_heads, self.head_dim)
        logits = torch.einsum("bhd,bnhd->bhn", _fp32(q), _fp32(k)) * self.head_dim**-0.5
        return logits.softmax(dim=-1)

    def forward(self, global_feat: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``global_feat`` (B, D), ``patches`` (B, N, D) -> ``(attn_gated, gate)``, each (B, H, N)."""
        attn = self.attention(global_feat, patches)
        gate = self.gate_from_cosine(self.head_cosine(global_feat, patches))
        attn_gated = attn * gate
        if self.renormalize_attn:
            attn_gated = attn_gated / (attn_gated.sum(dim=-1, keepdim=True) + RENORM_EPS)
        return attn_gated, gate

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, use_gate_norm={self.use_gate_norm}, "
            f"renormalize_attn={self.renormalize_attn}, param_bound={self.param_bound}"
        )


def num_keep_tokens(num_tokens: int, keep_ratio: float) -> int:
    """``ceil(keep_ratio * num_tokens)``, at least 1, at most ``num_tokens`` (robust to 0.3 * 10 = 3.0000000000000004)."""
    return min(num_tokens, max(1, math.ceil(round(keep_ratio * num_tokens, 6))))


class TokenSparse(nn.Module):
    """Score-based top-K patch selection with a score-weighted merge of the rest (no parameters).

    :meth:`forward` sorts the scores (descending, stable), keeps ``indices[:, :K]`` with
    ``K = ceil(keep_ratio * N)`` and, when ``K < N``, appends one token
    ``sum_{j not kept} s_j P_j / sum_{j not kept} s_j`` (scores are >= 0; the sum is clamped
    at ``eps``). The merged token carries the gradient back to the scores (the ranking itself
    is not differentiable).
    """

    def __init__(self, keep_ratio: float = 0.5, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)
        self.eps = float(eps)

    def num_keep(self, num_tokens: int) -> int:
        """K for N tokens."""
        return num_keep_tokens(num_tokens, self.keep_ratio)

    def num_output_tokens(self, num_tokens: int) -> int:
        """K plus the merged token when anything is left to merge."""
        k = self.num_keep(num_tokens)
        return k + (1 if k < num_tokens else 0)

    def forward(self, patches: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``patches`` (B, N, D), ``score`` (B, N) -> ``(tokens (B, K[+1], D), keep_indices (B, K))``."""
        b, n, d = patches.shape
        k = self.num_keep(n)
        sorted_score, indices = torch.sort(score, dim=1, descending=True, stable=True)
        keep_policy = indices[:, :k]
        kept = patches.gather(1, keep_policy.unsqueeze(-1).expand(b, k, d))
        if k == n:
            return kept, keep_policy
        rest = patches.gather(1, indices[:, k:].unsqueeze(-1).expand(b, n - k, d))
        w = sorted_score[:, k:]
        w = w / w.sum(dim=1, keepdim=True).clamp_min(self.eps)
        extra = torch.bmm(w.unsqueeze(1).to(rest.dtype), rest)  # (B, 1, D)
        return torch.cat([kept, extra], dim=1), keep_policy

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}"


@dataclass
class SDTPSOutput:
    """What :class:`SDTPS` returns.

    tokens: (M, B, K[+1], D) selected patches (+ merged token) per modality.
    keep_indices: (M, B, K) kept patch indices (0 .. N-1, row-major over the patch grid), best first.
    scores: (M, B, N) combined patch scores.
    stats: detached 0-d tensors (see :meth:`SDTPS.forward`).
    """

    tokens: torch.Tensor
    keep_indices: torch.Tensor
    scores: torch.Tensor
    stats: dict[str, torch.Tensor]


class SDTPS(nn.Module):
    """Nine cosine-gated attentions (3 self, 6 cross) and a :class:`TokenSparse` per modality.

    ``attn['{q}_to_{p}']`` is modality q's global token attending over modality p's patches.
    Missing modalities (``modality_mask[:, q] == False``) are left out of the cross-modal terms
    of the other modalities' scores and of the gate statistics.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 4,
        keep_ratio: float = 0.5,
        use_gate_norm: bool = False,
        renormalize_attn: bool = False,
        init_scale: float = 0.5,
        init_bias: float = 0.5,
        param_bound: float = 5.0,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_heads = num_heads
        self.attn = nn.ModuleDict(
            {
                f"{q}_to_{p}": CrossModalAttention(
                    embed_dim, num_heads, use_gate_norm=use_gate_norm, renormalize_attn=renormalize_attn,
                    init_scale=init_scale, init_bias=init_bias, param_bound=param_bound,
                )
                for p in self.modalities
                for q in self.modalities
            }
        )
        self.token_sparse = TokenSparse(keep_ratio)

    def num_output_tokens(self, num_patches: int) -> int:
        """Tokens per modality after selection (K + 1 merged, or N when nothing is dropped)."""
        return self.token_sparse.num_output_tokens(num_patches)

    def forward(
        self,
        global_tokens: torch.Tensor,
        patches: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
    ) -> SDTPSOutput:
        """``global_tokens`` (M, B, D), ``patches`` (M, B, N, D), ``modality_mask`` (B, M) bool or None.

        Stats (detached, 0-d): ``sdtps/gate_{mean,min,max}_h{h}`` over all present (query,
        patch) pairs, samples and patches; ``sdtps/gate_scale_h{h}`` / ``gate_bias_h{h}`` (mean
        over the nine attentions); ``sdtps/kept_ratio`` (K / N); ``sdtps/score_entropy`` and
        ``sdtps/score_entropy_{m}`` (entropy in nats of the scores normalised to sum 1, mean over
        present samples; the maximum is log N).
        """
        num_mod, b, n, d = patches.shape
        if num_mod != len(self.modalities):
            raise ValueError(f"expected {len(self.modalities)} modalities, got {num_mod}")
        present = modality_mask.t() if modality_mask is not None else None  # (M, B)
        attn_gated, gates = self._all_pairs(global_tokens, patches)  # (M_p, M_q, B, H, N) each
        pair_scores = attn_gated.mean(dim=3)  # (M_p, M_q, B, N): the heads' mean, per (patch, query) modality
        # score of p = (self term + the present other modalities' terms) / (1 + how many of them are present)
        if present is None:
            weight = pair_scores.new_ones(num_mod, num_mod, b)
        else:  # weight[p, q, b]: q's term counts for p when q is p or q is present
            eye = torch.eye(num_mod, dtype=torch.bool, device=patches.device)
            weight = (eye[:, :, None] | present[None]).to(pair_scores.dtype)  # (M_p, M_q, B)
        scores = (pair_scores * weight[..., None]).sum(dim=1) / weight.sum(dim=1)[..., None]  # (M, B, N)
        tokens, keep = self.token_sparse(patches.reshape(num_mod * b, n, d), scores.reshape(num_mod * b, n))
        pair_valid = (present[None] & present[:, None]).flatten(0, 1) if present is not None else None
        stats = self._stats(gates.flatten(0, 1), pair_valid, scores, present, n)
        return SDTPSOutput(tokens.reshape(num_mod, b, *tokens.shape[1:]), keep.reshape(num_mod, b, -1), scores, stats)

    def _stacked(self, order: str, name: str) -> torch.Tensor:
        """Parameter ``name`` of the nine attentions stacked as (M_p, M_q, ...) (``order`` "pq") or (M_q, M_p, ...)."""
        mods = self.modalities
        pairs = [(q, p) for p in mods for q in mods] if order == "pq" else [(q, p) for q in mods for p in mods]
        stacked = torch.stack([self.attn[f"{q}_to_{p}"].get_parameter(name) for q, p in pairs])
        return stacked.unflatten(0, (len(mods), len(mods)))

    def _all_pairs(self, global_tokens: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:class:`CrossModalAttention` of every (query q, patches p) pair at once -> ``(attn_gated, gate)``, each
        (M_p, M_q, B, H, N) in float32: the same formulas as nine calls, in a few batched kernels (the eager step
        is bound by kernel launches, and nine calls launch about ten times as many)."""
        num_mod, b, n, d = patches.shape
        first = next(iter(self.attn.values()))
        h, hd = first.num_heads, first.head_dim
        # projections: q of modality q for every p in one matmul, k of modality p's patches for every q in one
        wq = self._stacked("qp", "q_proj.weight").flatten(1, 2)  # (M_q, M_p * D, D)
        wk = self._stacked("pq", "k_proj.weight").flatten(1, 2)  # (M_p, M_q * D, D)
        if first.q_proj.bias is not None:
            bq = self._stacked("qp", "q_proj.bias").flatten(1, 2)[:, None]  # (M_q, 1, M_p * D)
            bk = self._stacked("pq", "k_proj.bias").flatten(1, 2)[:, None]
            q = torch.baddbmm(bq, global_tokens, wq.transpose(1, 2))
            k = torch.baddbmm(bk, patches.reshape(num_mod, b * n, d), wk.transpose(1, 2))
        else:
            q = torch.bmm(global_tokens, wq.transpose(1, 2))
            k = torch.bmm(patches.reshape(num_mod, b * n, d), wk.transpose(1, 2))
        q = _fp32(q).reshape(num_mod, b, num_mod, h, hd)  # (q, b, p, h, d)
        k = _fp32(k).reshape(num_mod, b, n, num_mod, h, hd)  # (p, b, n, q, h, d)
        attn = (torch.einsum("qbphd,pbnqhd->pqbhn", q, k) * hd**-0.5).softmax(dim=-1)
        # per-head cosine of the un-projected tokens
        g = F.normalize(_fp32(global_tokens).reshape(num_mod, b, h, hd), dim=-1)
        pn = F.normalize(_fp32(patches).reshape(num_mod, b, n, h, hd), dim=-1)
        cosine = torch.einsum("qbhd,pbnhd->pqbhn", g, pn)
        bound = first.param_bound
        scale = self._stacked("pq", "gate_scale").clamp(-bound, bound)[:, :, None, :, None]  # (M_p, M_q, 1, H, 1)
        bias = self._stacked("pq", "gate_bias").clamp(-bound, bound)[:, :, None, :, None]
        logits = cosine * scale + bias
        if first.gate_norm is not None:  # LayerNorm over the heads, each pair with its own affine
            weight = self._stacked("pq", "gate_norm.weight")[:, :, None, None, :]
            shift = self._stacked("pq", "gate_norm.bias")[:, :, None, None, :]
            normed = F.layer_norm(logits.transpose(3, 4), (h,), eps=first.gate_norm.eps)
            logits = (normed * weight + shift).transpose(3, 4)
        gate = torch.sigmoid(logits)
        attn_gated = attn * gate
        if first.renormalize_attn:
            attn_gated = attn_gated / (attn_gated.sum(dim=-1, keepdim=True) + RENORM_EPS)
        return attn_gated, gate

    @torch.no_grad()
    def _stats(
        self,
        gates: torch.Tensor,
        pair_valid: torch.Tensor | None,
        scores: torch.Tensor,
        present: torch.Tensor | None,
        num_patches: int,
    ) -> dict[str, torch.Tensor]:
        """gates (P, B, H, N), pair_valid (P, B), scores (M, B, N), present (M, B)."""
        stats: dict[str, torch.Tensor] = {}
        g = gates.detach().float()
        if pair_valid is None:
            valid = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
        else:
            valid = pair_valid
        v = valid[:, :, None, None].expand_as(g)
        count = v.sum(dim=(0, 1, 3)).clamp_min(1)  # (H,)
        mean = torch.where(v, g, torch.zeros_like(g)).sum(dim=(0, 1, 3)) / count
        gmin = torch.where(v, g, torch.full_like(g, float("inf"))).amin(dim=(0, 1, 3))
        gmax = torch.where(v, g, torch.full_like(g, float("-inf"))).amax(dim=(0, 1, 3))
        bound = next(iter(self.attn.values())).param_bound
        scale = self._stacked("pq", "gate_scale").detach().clamp(-bound, bound).flatten(0, 1).mean(0)
        bias = self._stacked("pq", "gate_bias").detach().clamp(-bound, bound).flatten(0, 1).mean(0)
        for h in range(self.num_heads):
            stats[f"sdtps/gate_mean_h{h}"] = mean[h]
            stats[f"sdtps/gate_min_h{h}"] = gmin[h]
            stats[f"sdtps/gate_max_h{h}"] = gmax[h]
            stats[f"sdtps/gate_scale_h{h}"] = scale[h]
            stats[f"sdtps/gate_bias_h{h}"] = bias[h]
        k = self.token_sparse.num_keep(num_patches)
        stats["sdtps/kept_ratio"] = g.new_full((), k / num_patches)
        s = scores.detach().float()
        prob = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        ent = -(prob * prob.clamp_min(1e-12).log()).sum(dim=-1)  # (M, B)
        w = present.float() if present is not None else torch.ones_like(ent)
        per_mod = (ent * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
        for i, m in enumerate(self.modalities):
            stats[f"sdtps/score_entropy_{m}"] = per_mod[i]
        stats["sdtps/score_entropy"] = (ent * w).sum() / w.sum().clamp_min(1)
        return stats
