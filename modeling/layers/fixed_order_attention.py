"""Attention whose backward pass is deterministic by construction: a fixed summation order, no atomic adds.

torch's fused attention kernels either sum gradients with atomic adds (their order, and so the rounding, changes
from run to run) or, under ``torch.use_deterministic_algorithms``, switch to slower deterministic variants; cuDNN's
is refused outright. :func:`fixed_order_attention` runs the repository's own Triton kernels
(:mod:`modeling.layers.fixed_order_kernels`), flash-attention tiles whose backward sums ``dK``/``dV`` per key tile
and ``dQ`` per query tile, each over the other side's tiles in one order. ``DETERMINISTIC_ATTENTION triton`` (the
default) makes the CLIP tower use it, in training and evaluation, under ``DETERMINISTIC True``; ``TEST.TRITON_ATTENTION``
(on by default) in every evaluation, where its forward pass is faster than cuDNN's at the tower's 129 tokens.

Inputs: q, k, v of shape (B, H, N, D), fp16 or bf16, on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``,
Triton's interpreter, which the tests use); D one of 16, 32, 64, 128. Unmasked, no dropout, scale 1/sqrt(D), as
the CLIP tower's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.layers.triton_device import HALF_DTYPES, triton_runs_on

HEAD_DIMS = (16, 32, 64, 128)
#: queries and keys a tile; one fixed tile for every run (a tile timed per run could change the sums' order)
BLOCKS = (16, 32, 64, 128)
DEFAULT_BLOCK = 64


def fixed_order_or_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`fixed_order_attention` where it runs (its device, dtypes and head dims), torch's
    ``scaled_dot_product_attention`` elsewhere (e.g. an fp32 tower, which SDPA's deterministic kernels cover)."""
    if q.dtype in HALF_DTYPES and q.shape[-1] in HEAD_DIMS and triton_runs_on(q.device):
        return fixed_order_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def fixed_order_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = DEFAULT_BLOCK
                          ) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for (B, H, N, D) inputs, with a deterministic backward pass; returns (B, H, N, D)
    laid out as (B, N, H, D), so merging the heads back is a view. ``block``: queries and keys a tile. With no
    gradient to record, a forward-only kernel runs, whose last tile is cut to the rows left (129 tokens: tiles of
    64, 64 and 16, not three of 64)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in HALF_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fixed-order attention runs in fp16 or bf16 (autocast), got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"fixed-order attention supports head dims {HEAD_DIMS}, got {q.shape[-1]}")
    # the kernels index from each tensor's first element in int32
    if max(sum([(n - 1) * st for n, st in zip(t.shape, t.stride())]) for t in (q, k, v)) >= 2**31:
        raise ValueError(f"fixed-order attention indexes in 32 bits; inputs of shape {tuple(q.shape)} span more "
                         "than 2**31 elements: split the batch")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block}")
    if not triton_runs_on(q.device):
        raise RuntimeError(f"fixed-order attention needs Triton and a CUDA device, got {q.device} "
                           "(set DETERMINISTIC_ATTENTION fused to use torch's kernels)")
    from modeling.layers import fixed_order_kernels  # noqa: F401  (registers the operators; imports Triton)

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, _ = torch.ops.fixed_order_attention.forward(q, k, v, block)
        return out
    return torch.ops.fixed_order_attention.inference(q, k, v, block)
