"""Triton kernels of :mod:`modeling.layers.fixed_order_attention`: attention whose backward pass sums in one
fixed order.

Flash-attention style (tiles of queries and keys, an online softmax, the probabilities recomputed in the
backward pass from the saved log-sum-exp), with one difference from torch's fused kernels: no gradient is summed
with atomic adds. The backward runs two kernels: one program per key tile sums its ``dK``/``dV`` over the query
tiles in order, one program per query tile sums its ``dQ`` over the key tiles in order. Every sum therefore has
the same order on every run, whatever the scheduling, at the cost of computing ``Q K^T`` once more.

Importing this module needs Triton; it registers two torch operators (``fixed_order_attention::forward`` and
``::backward``, ``torch.library.custom_op`` with shape functions), which ``torch.compile`` keeps whole in its
graphs and CUDA graphs capture.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from modeling.layers.fixed_order_attention import DEFAULT_BLOCK as BLOCK

#: launch settings: fixed, never timed on the device, so the sums' order is the same on every run (the tile:
#: ``DEFAULT_BLOCK``)
NUM_STAGES = 2
LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(PTR, b, h, s_b, s_h, s_n, rows, offs_d, N):
    """Rows ``rows`` (zeros past N) of one (batch, head)'s (N, D) matrix."""
    return tl.load(PTR + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :], mask=(rows < N)[:, None],
                   other=0.0)


@triton.jit
def _store_rows(PTR, value, b, h, s_b, s_h, s_n, rows, offs_d, N):
    tl.store(PTR + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :], value.to(PTR.dtype.element_ty),
             mask=(rows < N)[:, None])


@triton.jit
def _probabilities(q, k, lse, qk_scale, rows, cols, N):
    """The attention probabilities of a (query tile, key tile) pair, recomputed from the saved log2-sum-exp."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    return tl.where((rows < N)[:, None] & (cols < N)[None, :], p, 0.0)


@triton.jit
def _fold_key_tile(s, v, m_i, l_i, acc):
    """The online softmax's step: one key tile's scores ``s`` (log2 domain) and values ``v`` folded into the rows'
    running maximum ``m_i``, sum ``l_i`` and unnormalised output ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _forward_kernel(Q, K, V, OUT, LSE, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                    H, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head): O = softmax(Q K^T * scale) V, and the rows' log2-sum-exp."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_rows(Q, b, h, sq_b, sq_h, sq_n, rows, offs_d, N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, b, h, sk_b, sk_h, sk_n, cols, offs_d, N)
        v = _load_rows(V, b, h, sv_b, sv_h, sv_n, cols, offs_d, N)
        s = tl.where((cols < N)[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))  # log2 domain
        m_i, l_i, acc = _fold_key_tile(s, v, m_i, l_i, acc)
    _store_rows(OUT, acc / l_i[:, None], b, h, so_b, so_h, so_n, rows, offs_d, N)
    tl.store(LSE + bh * N + rows, m_i + tl.math.log2(l_i), mask=rows < N)


@triton.jit
def _attend_rows(Q, K, V, OUT, b, h, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                 rows, N, qk_scale, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr):
    """O = softmax(Q K^T * scale) V for ``ROWS`` query rows of one (batch, head): the keys in whole tiles of
    ``BLOCK_N``, then the ``N % BLOCK_N`` keys left in one tile of ``TAIL_N`` (none if 0)."""
    offs_d = tl.arange(0, D)
    q = _load_rows(Q, b, h, sq_b, sq_h, sq_n, rows, offs_d, N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    whole = (N // BLOCK_N) * BLOCK_N
    for start in range(0, whole, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_n + offs_d[None, :])
        v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_n + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain
        m_i, l_i, acc = _fold_key_tile(s, v, m_i, l_i, acc)
    if TAIL_N > 0:
        cols = whole + tl.arange(0, TAIL_N)
        k = _load_rows(K, b, h, sk_b, sk_h, sk_n, cols, offs_d, N)
        v = _load_rows(V, b, h, sv_b, sv_h, sv_n, cols, offs_d, N)
        s = tl.where((cols < N)[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_i, l_i, acc = _fold_key_tile(s, v, m_i, l_i, acc)
    _store_rows(OUT, acc / l_i[:, None], b, h, so_b, so_h, so_n, rows, offs_d, N)


@triton.jit
def _inference_kernel(Q, K, V, OUT, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                      H, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
    """One query tile of one (batch, head), forward only: the programs before the last take whole tiles of
    ``BLOCK_M`` rows, the last the ``N % BLOCK_M`` rows left in a tile of ``TAIL_M``; keys likewise (whole tiles,
    then one of ``TAIL_N``). So 129 tokens cost tiles of 64 + 64 + 16 a side, not 3 x 64."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    first = tl.program_id(0) * BLOCK_M
    if first + BLOCK_M <= N:
        _attend_rows(Q, K, V, OUT, b, h, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                     first + tl.arange(0, BLOCK_M), N, qk_scale, D, BLOCK_M, BLOCK_N, TAIL_N)
    else:
        _attend_rows(Q, K, V, OUT, b, h, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                     first + tl.arange(0, TAIL_M), N, qk_scale, D, TAIL_M, BLOCK_N, TAIL_N)


@triton.jit
def _dq_kernel(Q, K, V, OUT, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
               so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, H, N, qk_scale, scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile: dQ summed over the key tiles in order; also writes the tile's rowsum(dO * O)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_rows(Q, b, h, sq_b, sq_h, sq_n, rows, offs_d, N)
    do = _load_rows(DO, b, h, sdo_b, sdo_h, sdo_n, rows, offs_d, N)
    o = _load_rows(OUT, b, h, so_b, so_h, so_n, rows, offs_d, N)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, b, h, sk_b, sk_h, sk_n, cols, offs_d, N)
        v = _load_rows(V, b, h, sv_b, sv_h, sv_n, cols, offs_d, N)
        p = _probabilities(q, k, lse, qk_scale, rows, cols, N)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _store_rows(DQ, dq * scale, b, h, sdq_b, sdq_h, sdq_n, rows, offs_d, N)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                 sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, H, N, qk_scale, scale,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile: dK and dV summed over the query tiles in order."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _load_rows(K, b, h, sk_b, sk_h, sk_n, cols, offs_d, N)
    v = _load_rows(V, b, h, sv_b, sv_h, sv_n, cols, offs_d, N)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, b, h, sq_b, sq_h, sq_n, rows, offs_d, N)
        do = _load_rows(DO, b, h, sdo_b, sdo_h, sdo_n, rows, offs_d, N)
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        p = _probabilities(q, k, lse, qk_scale, rows, cols, N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_rows(DK, dk * scale, b, h, sdk_b, sdk_h, sdk_n, cols, offs_d, N)
    _store_rows(DV, dv, b, h, sdv_b, sdv_h, sdv_n, cols, offs_d, N)


def _like_heads_last(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor laid out as (B, N, H, D): the layout the tower's heads merge from for free."""
    b, h, n, d = t.shape
    return t.new_empty(b, n, h, d).transpose(1, 2)


def _forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty output (heads last) and float32 log2-sum-exp (B, H, N): what the forward op returns, real or fake."""
    b, h, n, _ = q.shape
    return _like_heads_last(q), q.new_empty(b, h, n, dtype=torch.float32)


def _backward_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty dq, dk, dv (heads last): what the backward op returns, real or fake."""
    return _like_heads_last(q), _like_heads_last(k), _like_heads_last(v)


def _warps(block: int) -> int:
    return 8 if block >= 128 else 4


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError(f"attention inputs need a contiguous last dimension, got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("fixed_order_attention::forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) q, k, v -> output (B, H, N, D) and the rows' log2-sum-exp (B, H, N) float32; ``block``
    queries and keys a tile (16, 32, 64 or 128)."""
    b, h, n, d = q.shape
    out, lse = _forward_outputs(q)
    scale = 1.0 / math.sqrt(d)
    _forward_kernel[(triton.cdiv(n, block), b * h)](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, n, scale * LOG2E,
        D=d, BLOCK_M=block, BLOCK_N=block, num_warps=_warps(block), num_stages=NUM_STAGES)
    return out, lse


def tail_tile(n: int, block: int) -> int:
    """The tile that covers the ``n % block`` rows (or keys) left after the whole tiles: the smallest power of
    two of at least 16 (the least a ``tl.dot`` takes), 0 where none are left."""
    left = n % block
    return 0 if left == 0 else max(16, triton.next_power_of_2(left))


@torch.library.custom_op("fixed_order_attention::inference", mutates_args=())
def attention_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(B, H, N, D) q, k, v -> output (B, H, N, D), forward only (no log-sum-exp kept): tiles of ``block``
    queries and keys, the remainder of N in a tile cut to fit (:func:`tail_tile`)."""
    b, h, n, d = q.shape
    out = _like_heads_last(q)
    tail = tail_tile(n, block)
    _inference_kernel[(triton.cdiv(n, block), b * h)](
        q, k, v, out, *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, n,
        1.0 / math.sqrt(d) * LOG2E, D=d, BLOCK_M=block, BLOCK_N=block, TAIL_M=tail or block, TAIL_N=tail,
        num_warps=_warps(block), num_stages=NUM_STAGES)
    return out


@attention_inference.register_fake
def _inference_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    return _like_heads_last(q)


@torch.library.custom_op("fixed_order_attention::backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                       lse: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) of :func:`attention_forward`, each summed in one fixed order."""
    b, h, n, d = q.shape
    dq, dk, dv = _backward_outputs(q, k, v)
    delta = torch.empty_like(lse)
    scale = 1.0 / math.sqrt(d)
    _dq_kernel[(triton.cdiv(n, block), b * h)](
        q, k, v, out, grad_out, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *_strides(grad_out), *_strides(dq), h, n, scale * LOG2E, scale,
        D=d, BLOCK_M=block, BLOCK_N=block, num_warps=_warps(block), num_stages=NUM_STAGES)
    _dkdv_kernel[(triton.cdiv(n, block), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dk), *_strides(dv), h, n, scale * LOG2E, scale,
        D=d, BLOCK_M=block, BLOCK_N=block, num_warps=_warps(block), num_stages=NUM_STAGES)
    return dq, dk, dv


@attention_forward.register_fake
def _forward_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_outputs(q)


@attention_backward.register_fake
def _backward_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                     lse: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_outputs(q, k, v)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    q, k, v, block = inputs
    out, lse = output
    ctx.block = block
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):  # noqa: ANN001, ANN202
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return (*attention_backward(q, k, v, out, grad_out, lse, ctx.block), None)


torch.library.register_autograd("fixed_order_attention::forward", _backward, setup_context=_setup_context)
