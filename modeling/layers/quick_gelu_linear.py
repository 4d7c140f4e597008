"""``quick_gelu(x @ w^T + b)`` as one Triton kernel: the first half of the CLIP tower's MLP in evaluation.

CLIP's MLP widens each token 4x, applies QuickGELU (``y * sigmoid(1.702 y)``) and projects back. In bf16 the
matmul runs at cuBLAS speed, but the activation is a separate kernel that reads and writes the widest tensor of
the tower, at its memory bound: 2.4 of an evaluation batch's 21.5 ms on an H100 (BENCHMARKS.md). The kernel of
:mod:`modeling.layers.quick_gelu_linear_kernel` applies it to the matmul's fp32 accumulator before the one store
(one rounding to the half dtype, where the two kernels round twice).

Forward only, fp16 or bf16, on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``, which the tests use);
:func:`quick_gelu_linear_or_torch` falls back to torch's ``F.linear`` and QuickGELU elsewhere. The CLIP tower
evaluates with it under ``TEST.FUSED_MLP True`` (the default) on GPUs of compute capability 9.0 or more
(:func:`fused_mlp_fits_this_gpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.layers.triton_device import HALF_DTYPES, this_gpu_reaches, triton_runs_on

#: the kernel's input slices are this many columns wide (``LAUNCH.block_k``); K must be a multiple of it
K_MULTIPLE = 64
#: the oldest GPUs the fused layer pays on: compute capability 9.0 (Hopper), whose Tensor Memory Accelerator reads
#: the tiles; on an H200, the same kernel reading its tiles with plain loads took 0.593 ms against 0.334 for
#: cuBLAS's matmul alone (BENCHMARKS.md), slower than the matmul and QuickGELU apart
MIN_CAPABILITY = (9, 0)


def fused_mlp_fits_this_gpu() -> bool:
    """False on a machine whose current CUDA GPU predates Hopper (capability < 9.0); True elsewhere."""
    return this_gpu_reaches(MIN_CAPABILITY)


def quick_gelu(y: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, ``y * sigmoid(1.702 y)``."""
    return y * torch.sigmoid(1.702 * y)


def quick_gelu_linear_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`quick_gelu_linear` runs for these inputs: no gradient recorded, a half dtype, a device the
    Triton kernels run on, K a multiple of ``K_MULTIPLE``."""
    return (not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.dtype in HALF_DTYPES and weight.shape[-1] % K_MULTIPLE == 0 and x.numel() > 0
            and triton_runs_on(x.device))


def quick_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``quick_gelu(x @ weight^T + bias)`` in one kernel: ``x`` (..., K), ``weight`` (N, K), ``bias`` (N,), all
    fp16 or all bf16 -> (..., N). Records no gradient."""
    if not (x.dtype in HALF_DTYPES and weight.dtype == x.dtype and bias.dtype == x.dtype):
        raise ValueError(f"quick_gelu_linear runs in fp16 or bf16, got {x.dtype}, {weight.dtype}, {bias.dtype}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}")
    if weight.shape[1] % K_MULTIPLE:
        raise ValueError(f"quick_gelu_linear needs K a multiple of {K_MULTIPLE}, got {weight.shape[1]}")
    from modeling.layers import quick_gelu_linear_kernel  # noqa: F401  (registers the operator; imports Triton)

    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.quick_gelu_linear.forward(rows if rows.stride(-1) == 1 else rows.contiguous(),
                                              weight.contiguous(), bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])


def quick_gelu_linear_or_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`quick_gelu_linear` where it runs (:func:`quick_gelu_linear_runs`), else ``F.linear`` then
    :func:`quick_gelu`. Under autocast the inputs are cast to its dtype first, as ``F.linear`` would cast them."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    if quick_gelu_linear_runs(x, weight):
        return quick_gelu_linear(x, weight, bias)
    return quick_gelu(F.linear(x, weight, bias))
