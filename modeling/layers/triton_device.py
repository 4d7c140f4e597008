"""Where the repository's Triton kernels (the fixed-order attention, the fused MLP) can run.

They run in fp16 or bf16 on a CUDA GPU of compute capability 8.0 or more, or on the CPU under ``TRITON_INTERPRET=1``
(Triton's interpreter, which the tests use). The checks are read once at import and are plain comparisons, so they
cost nothing inside compiled graphs.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: the oldest GPUs the kernels are built for: Triton supports compute capability 8.0 (Ampere) and newer since 3.3,
#: and its bf16 matmuls need it
MIN_CAPABILITY = (8, 0)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device``: Triton is importable and the device is CUDA (or the CPU under
    Triton's interpreter)."""
    device_type = torch.device(device).type
    return TRITON_INSTALLED and (device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRETED))


def triton_compiles_to_ptx(device: torch.device | str) -> bool:
    """Whether Triton compiles kernels on ``device`` to NVIDIA's PTX, so that they may hold inline PTX: a CUDA
    device of an NVIDIA build of torch (not ROCm), and not under Triton's interpreter."""
    return torch.device(device).type == "cuda" and torch.version.hip is None and not TRITON_INTERPRETED


def this_gpu_reaches(capability: tuple[int, int]) -> bool:
    """False on a machine whose current CUDA GPU has a lower compute capability than ``capability``; True
    elsewhere (no GPU included). Read where a model is built, outside compiled code."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= capability


def triton_fits_this_gpu() -> bool:
    """False on a machine whose current CUDA GPU predates Ampere (capability < 8.0); True elsewhere."""
    return this_gpu_reaches(MIN_CAPABILITY)
