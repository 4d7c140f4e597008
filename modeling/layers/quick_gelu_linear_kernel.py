"""Triton kernel of :mod:`modeling.layers.quick_gelu_linear`: ``quick_gelu(x @ w^T + b)`` in one pass.

A tiled matmul (fp32 accumulator) whose epilogue adds the bias and applies QuickGELU, ``y * sigmoid(1.702 y)``,
before the one store: the activation never makes the round trip through GPU memory that a matmul followed by a
separate elementwise kernel costs (the CLIP tower's widest tensor, 4x its width). Forward only: evaluation.

Importing this module needs Triton; it registers the torch operator ``quick_gelu_linear::forward``
(``torch.library.custom_op`` with a shape function), which ``torch.compile`` keeps whole in its graphs and CUDA
graphs capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: launch settings, fixed (never timed per run, so a run's numbers do not depend on a timing): tiles of
#: BLOCK_M x BLOCK_N outputs summed over BLOCK_K-wide slices of the input, GROUP_M row tiles side by side so that
#: the weight tiles they share stay in L2; Hopper's usual bf16 matmul tile, not yet compared on a GPU
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 128, 256, 64, 8
NUM_WARPS, NUM_STAGES = 8, 3
QUICK_GELU_ALPHA = 1.702


@triton.jit
def _quick_gelu_linear_kernel(X, W, BIAS, Y, M, N, K, sx_m, sw_n, sy_m, ALPHA: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of Y = quick_gelu(X W^T + BIAS); K a multiple of BLOCK_K."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the end wrap around: every load stays in bounds unmasked; the store masks them
    rows_in = rows % M
    cols_in = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows_in[:, None] * sx_m + offs_k[None, :]
    w_ptrs = W + cols_in[None, :] * sw_n + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc += tl.load(BIAS + cols_in).to(tl.float32)[None, :]
    y = acc * tl.sigmoid(ALPHA * acc)
    tl.store(Y + rows[:, None] * sy_m + cols[None, :], y.to(Y.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("quick_gelu_linear::forward", mutates_args=())
def quick_gelu_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, K) x, (N, K) weight, (N,) bias, one half dtype, rows contiguous, K a multiple of ``BLOCK_K`` ->
    (M, N) ``quick_gelu(x @ weight^T + bias)``."""
    m, k = x.shape
    n = weight.shape[0]
    y = _output(x, weight)
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _quick_gelu_linear_kernel[grid](x, weight, bias, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                                    ALPHA=QUICK_GELU_ALPHA, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                    GROUP_M=GROUP_M, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


@quick_gelu_linear_forward.register_fake
def _forward_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _output(x, weight)
