"""SAP (Semantic Anchor Purification) with a learnable, bounded logit scale.

Every feature of an episode cross-attends over the episode's N class anchors and is
"purified" by a residual mix with the anchor it attends to:

    q      = normalize(W_q f)                       (..., M, D)   features
    k      = normalize(W_k a)                       (..., N, D)   anchors
    s      = exp(logit_scale_log).clamp(max=100)    scalar        learnable, bounded
    logits = s * q k^T  - rowmax                    (..., M, N)   cosine logits, multiplied by s
    attn   = softmax(logits)                        (..., M, N)
    out    = normalize(f) + lam * W_v (attn @ normalize(a))

``W_q``, ``W_k``, ``W_v`` are D x D linear maps initialised to the identity (``projections``
False drops them), ``lam`` is the purification weight in [0, 1] (a sigmoid-bounded
:class:`BoundedScale`, init 0.5).

The cosine logits are *multiplied* by a learnable scale, because dividing them by a fixed
``temperature = sqrt(phy_dim)`` (25.3 for 640) leaves them within +-0.04 and the attention
nearly uniform ("sprinkling sugar evenly"; docs/decisions.md). The scale is initialised at
25 with CLIP's ceiling of 100, kept in log space by the shared
:class:`~modeling.layers.BoundedScale` (so it stays positive), and exposed as
``logit_scale_log`` (the very same ``nn.Parameter``) for the optimizer, which must not apply
weight decay to it (decay would pull log-scale to 0, i.e. the scale to 1).

``scale_mode`` selects the ablation:

* ``learnable`` (default): the bounded learnable scale above;
* ``fixed``: a constant multiplier ``1 / sqrt(phy_dim)`` (logits divided by the fixed
  temperature ``sqrt(phy_dim)``), not a parameter;
* ``constant``: a constant multiplier equal to ``logit_scale_init`` (25), not a parameter.

There is deliberately no ``temperature`` attribute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modeling.layers.bounded_scale import BoundedScale

SCALE_MODES = ("learnable", "fixed", "constant")


class SemanticAnchorPurification(nn.Module):
    """Cross-attention of features over class anchors with a learnable bounded logit scale.

    Args:
        phy_dim: feature dimension D of features and anchors (640 for ResNet-12).
        logit_scale_init: initial logit scale (25.0).
        logit_scale_max: ceiling of the logit scale (100.0, CLIP's).
        scale_mode: ``learnable`` | ``fixed`` (1 / sqrt(phy_dim), frozen) | ``constant`` (init, frozen).
        purify_init: initial residual weight ``lam`` of the attended anchor, in (0, 1).
        projections: learn D x D query/key/value maps (identity init); False: plain cosine.
    """

    def __init__(self, phy_dim: int, logit_scale_init: float = 25.0, logit_scale_max: float = 100.0,
                 scale_mode: str = "learnable", purify_init: float = 0.5, projections: bool = True) -> None:
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"MODEL.SAP.SCALE_MODE must be one of {SCALE_MODES}, got {scale_mode!r}")
        if not 0.0 < purify_init < 1.0:
            raise ValueError(f"MODEL.SAP.PURIFY_INIT must be in (0, 1), got {purify_init}")
        if not 0.0 < logit_scale_init <= logit_scale_max:
            raise ValueError(f"need 0 < LOGIT_SCALE_INIT <= LOGIT_SCALE_MAX, got {logit_scale_init}, {logit_scale_max}")
        self.phy_dim = int(phy_dim)
        self.scale_mode = scale_mode
        self.logit_scale_max = float(logit_scale_max)
        init = 1.0 / math.sqrt(phy_dim) if scale_mode == "fixed" else float(logit_scale_init)
        self.logit_scale = BoundedScale(init, max_value=self.logit_scale_max, parameterization="log",
                                        constraint="clamp", learnable=scale_mode == "learnable",
                                        name="sap.logit_scale")
        self.purify_weight = BoundedScale(purify_init, min_value=0.0, max_value=1.0, parameterization="raw",
                                          constraint="sigmoid", name="sap.purify_weight")
        if projections:
            self.q_proj: nn.Module = _identity_linear(phy_dim)
            self.k_proj: nn.Module = _identity_linear(phy_dim)
            self.v_proj: nn.Module = _identity_linear(phy_dim)
        else:
            self.q_proj = self.k_proj = self.v_proj = nn.Identity()

    @property
    def logit_scale_log(self) -> torch.Tensor:
        """log of the (unclamped) logit scale: the ``nn.Parameter`` the optimizer gets (a buffer when frozen)."""
        return self.logit_scale.raw

    def compute_cross_attention(self, features: torch.Tensor, anchors: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of features (..., M, D) over anchors (..., N, D).

        Returns ``(attn, log_attn, scale)``: ``attn`` (..., M, N) rows summing to 1, its log
        (finite, for the entropy), and the effective scale (0-d, ``exp(log).clamp(max)``).
        Logits are computed in float32 even under autocast.
        """
        q = F.normalize(self.q_proj(features).float(), dim=-1)
        k = F.normalize(self.k_proj(anchors).float(), dim=-1)
        scale = self.logit_scale()
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        logits = logits - logits.max(dim=-1, keepdim=True).values  # row-wise max subtraction
        log_attn = torch.log_softmax(logits, dim=-1)
        return log_attn.exp(), log_attn, scale

    def forward(self, features: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Purify features (..., M, D) with anchors (..., N, D) -> ((..., M, D), stats).

        Stats (detached 0-d tensors, no host sync): ``attn_entropy`` (mean row entropy,
        nats; log N when uniform), ``attn_max`` (mean row maximum; 1/N when uniform),
        ``logit_scale`` (effective scale), ``logit_scale_clipped`` (1.0 when the scale sat
        at the ceiling in this call, else 0.0; its mean over steps is the clipped fraction).
        """
        if features.shape[-1] != self.phy_dim or anchors.shape[-1] != self.phy_dim:
            raise ValueError(f"SAP expects feature dim {self.phy_dim}; got features {tuple(features.shape)}, "
                             f"anchors {tuple(anchors.shape)}")
        attn, log_attn, scale = self.compute_cross_attention(features, anchors)
        anchors_unit = F.normalize(anchors.float(), dim=-1)
        attended = self.v_proj(torch.matmul(attn, anchors_unit).to(anchors.dtype))
        purified = F.normalize(features, dim=-1) + self.purify_weight() * attended
        with torch.no_grad():
            unclamped = self.logit_scale_log.detach().exp() if self.logit_scale.parameterization == "log" else scale
            stats = {
                "attn_entropy": -(attn * log_attn).sum(-1).mean().detach(),
                "attn_max": attn.max(dim=-1).values.mean().detach(),
                "logit_scale": scale.detach().clone(),
                "logit_scale_clipped": (unclamped >= self.logit_scale_max).float(),
                "purify_weight": self.purify_weight.value(),
            }
        return purified, stats

    def extra_repr(self) -> str:
        return f"phy_dim={self.phy_dim}, scale_mode={self.scale_mode}, logit_scale_max={self.logit_scale_max}"


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer
