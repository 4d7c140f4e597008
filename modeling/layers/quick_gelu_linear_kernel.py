"""Triton kernels of :mod:`modeling.layers.quick_gelu_linear`: ``quick_gelu(x @ w^T + b)`` in one pass.

A tiled matmul (fp32 accumulator) whose epilogue adds the bias and applies QuickGELU, ``y * sigmoid(1.702 y)``,
before the one store: the activation never makes the round trip through GPU memory that a matmul followed by a
separate elementwise kernel costs (the CLIP tower's widest tensor, 4x its width). Forward only: evaluation.

Two kernels compute the same sums in the same order (one ``tl.dot`` per ``BLOCK_K`` slice, in order of K):

- ``_descriptor_kernel`` reads its tiles through tensor descriptors, which GPUs of compute capability 9.0 or
  more (Hopper) serve with their Tensor Memory Accelerator, from a persistent grid of one program per SM;
- ``_pointer_kernel`` reads them with plain loads: older GPUs, and inputs whose rows are not 16-byte aligned.

Importing this module needs Triton; it registers the torch operator ``quick_gelu_linear::forward``
(``torch.library.custom_op`` with a shape function), which ``torch.compile`` keeps whole in its graphs and CUDA
graphs capture.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from modeling.layers.triton_device import triton_compiles_to_ptx

QUICK_GELU_ALPHA = 1.702


class Launch(NamedTuple):
    """How a kernel is launched: tiles of ``block_m`` x ``block_n`` outputs summed over ``block_k``-wide slices
    of the input, ``group_m`` row tiles side by side (the weight tiles they share stay in L2), ``warps`` and
    software-pipeline ``stages``. ``descriptors``: read through tensor descriptors where the GPU has them;
    ``subtile``: the descriptor kernel stores each tile as two halves (less shared memory for the epilogue);
    ``specialize``: it splits its warps into loading and computing groups (Triton's warp specialization)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int
    descriptors: bool
    subtile: bool
    specialize: bool = False


#: the launch, fixed (never timed per run, so that a run's numbers do not depend on a timing): the fastest of ten
#: timed on an H100 at the evaluation's MLP shape (49,536 x 768 -> 3,072, bf16), 0.450 ms against cuBLAS's 0.346
#: for the matmul alone (BENCHMARKS.md); warp specialization timed the same (0.4497 against 0.4498 ms), so it
#: stays off
LAUNCH = Launch(block_m=128, block_n=256, block_k=64, group_m=8, warps=8, stages=4, descriptors=True, subtile=True)


@triton.jit
def _tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the ``tile``-th output tile, ``GROUP_M`` row tiles to a group."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _epilogue(acc, BIAS, cols, N, ALPHA: tl.constexpr, PTX: tl.constexpr):
    """QuickGELU of the accumulator plus the bias, ``y * sigmoid(ALPHA y) = y / (1 + 2^(-ALPHA log2(e) y))``, in
    fp32.

    ``PTX`` (an NVIDIA GPU): the exponential is ``ex2.approx.ftz.f32`` and the quotient ``div.full.f32``, the
    operations ``tl.sigmoid``'s product compiles to, less the exponential's handling of subnormal results (where
    2^u is subnormal, 1 + 2^u rounds to 1 either way): the same outputs from fewer instructions. Elsewhere
    (Triton's interpreter, also for CUDA tensors) ``tl.sigmoid`` itself."""
    acc += tl.load(BIAS + cols, mask=cols < N).to(tl.float32)[None, :]
    if PTX:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [(acc * -ALPHA) * 1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("div.full.f32 $0, $1, $2;", "=r,r,r", [acc, 1.0 + e],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return acc * tl.sigmoid(ALPHA * acc)


@triton.jit
def _pointer_kernel(X, W, BIAS, Y, M, N, K, sx_m, sw_n, sy_m, ALPHA: tl.constexpr, PTX: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of Y = quick_gelu(X W^T + BIAS); K a multiple of BLOCK_K."""
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the end wrap around: every load stays in bounds unmasked; the store masks them
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rows % M)[:, None] * sx_m + offs_k[None, :]
    w_ptrs = W + (cols % N)[None, :] * sw_n + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = _epilogue(acc, BIAS, cols, N, ALPHA, PTX)
    tl.store(Y + rows[:, None] * sy_m + cols[None, :], y.to(Y.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _descriptor_kernel(X, W, BIAS, Y, M, N, K, ALPHA: tl.constexpr, PTX: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
                       SUBTILE: tl.constexpr, SPECIALIZE: tl.constexpr):
    """Output tiles ``program_id, program_id + PROGRAMS, ...`` of Y = quick_gelu(X W^T + BIAS), X, W and Y
    tensor descriptors (reads past the end are zeros, writes past it are dropped); K a multiple of BLOCK_K."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True, warp_specialize=SPECIALIZE):
        pid_m, pid_n = _tile_of(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            acc = tl.dot(X.load([row, k]), W.load([col, k]).T, acc)
        y = _epilogue(acc, BIAS, col + tl.arange(0, BLOCK_N), N, ALPHA, PTX).to(Y.dtype)
        if SUBTILE:
            left, right = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            Y.store([row, col], left)
            Y.store([row, col + BLOCK_N // 2], right)
        else:
            Y.store([row, col], y)


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can read these 2-d tensors on their device: a GPU of compute capability 9.0 or
    more (or Triton's interpreter), 16-byte aligned starts and row strides, contiguous rows."""
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def _programs(device: torch.device, tiles: int) -> int:
    """One program per SM (a persistent grid), at most one per tile; every tile its own program on the CPU."""
    if device.type != "cuda":
        return tiles
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, how: Launch,
           ptx_epilogue: bool | None = None) -> None:
    """Write ``quick_gelu(x @ weight^T + bias)`` into ``y`` ((M, N), rows contiguous) with launch ``how``;
    ``ptx_epilogue``: QuickGELU through the PTX instructions of ``_epilogue`` (default: where the kernels compile
    to PTX) or through ``tl.sigmoid``."""
    ptx = triton_compiles_to_ptx(x.device) if ptx_epilogue is None else ptx_epilogue
    m, k = x.shape
    n = weight.shape[0]
    tiles = triton.cdiv(m, how.block_m) * triton.cdiv(n, how.block_n)
    if how.descriptors and descriptors_fit(x, weight, y):
        store_n = how.block_n // 2 if how.subtile else how.block_n
        programs = _programs(x.device, tiles)
        _descriptor_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [how.block_m, how.block_k]),
            TensorDescriptor.from_tensor(weight, [how.block_n, how.block_k]), bias,
            TensorDescriptor.from_tensor(y, [how.block_m, store_n]), m, n, k, ALPHA=QUICK_GELU_ALPHA, PTX=ptx,
            BLOCK_M=how.block_m, BLOCK_N=how.block_n, BLOCK_K=how.block_k, GROUP_M=how.group_m, PROGRAMS=programs,
            SUBTILE=how.subtile, SPECIALIZE=how.specialize, num_warps=how.warps, num_stages=how.stages)
        return
    _pointer_kernel[(tiles,)](x, weight, bias, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                              ALPHA=QUICK_GELU_ALPHA, PTX=ptx, BLOCK_M=how.block_m, BLOCK_N=how.block_n,
                              BLOCK_K=how.block_k, GROUP_M=how.group_m, num_warps=how.warps, num_stages=how.stages)


def _output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("quick_gelu_linear::forward", mutates_args=())
def quick_gelu_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, K) x, (N, K) weight, (N,) bias, one half dtype, rows contiguous, K a multiple of ``LAUNCH.block_k``
    -> (M, N) ``quick_gelu(x @ weight^T + bias)``."""
    y = _output(x, weight)
    launch(x, weight, bias, y, LAUNCH)
    return y


@quick_gelu_linear_forward.register_fake
def _forward_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _output(x, weight)
