"""Seeding, determinism, and the RNG state a checkpoint carries so a resumed run draws the same numbers."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: ``DETERMINISTIC_ATTENTION``: the attention kernels a deterministic run lets SDPA pick
DETERMINISTIC_ATTENTION = ("math", "fused", "triton")


def seed_everything(seed: int, deterministic: bool = False, attention: str = "fused",
                    fill_uninitialized: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels.

    ``deterministic`` is strict: an operation without a deterministic implementation raises (naming it)
    instead of silently running a nondeterministic kernel. ``attention`` says which kernels SDPA may then
    use: ``math`` alone, or also the ``fused`` flash and memory-efficient kernels, whose backward passes torch
    runs in their deterministic variants under strict deterministic algorithms (flash's deterministic
    ``mha_bwd``, memory-efficient with one key split) while it excludes cuDNN's attention itself (evaluation
    may still use it: :func:`forward_only_kernels`). ``triton`` sets what ``fused`` sets; the models read it
    too (the CLIP tower then trains with :mod:`modeling.layers.fixed_order_attention`). ``fill_uninitialized``
    keeps torch's default of filling every new uninitialised tensor (NaN for floats) under deterministic
    algorithms, so that a kernel reading memory it never wrote gives the same (NaN) result every run; off,
    those fills (thousands of kernels a step, BENCHMARKS.md) are skipped, and two runs compared byte for byte
    still show such a read.
    """
    if attention not in DETERMINISTIC_ATTENTION:
        raise ValueError(f"attention must be one of {DETERMINISTIC_ATTENTION}, got {attention!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
        # Under warn_only the fused attention kernels' backward passes are not deterministic (two runs differed,
        # BENCHMARKS.md); strict, torch picks their deterministic variants. "math" keeps to the math kernel.
        set_fused_attention(attention != "math")
        torch.utils.deterministic.fill_uninitialized_memory = fill_uninitialized
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        set_fused_attention(True)
        torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default; read only when deterministic


@contextlib.contextmanager
def forward_only_kernels() -> Iterator[None]:
    """Inside, strict deterministic algorithms relax to warn-only, for code that runs no backward pass
    (evaluation).

    Strict mode refuses cuDNN's attention outright because its backward pass is not deterministic; its forward
    pass is (each query tile sums over the keys in one fixed order), and it is the fastest attention kernel at
    the CLIP tower's 129 tokens (BENCHMARKS.md). Warn-only lets SDPA pick it and changes nothing else an
    evaluation runs: every operation keeps its deterministic implementation, and the only operations that act
    differently, those with none, would have raised under strict mode. Without strict deterministic
    algorithms (or with ``DETERMINISTIC_ATTENTION math``, where cuDNN's attention is off) nothing changes.
    """
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True)


def set_fused_attention(enabled: bool) -> None:
    """Allow (or forbid) the fused scaled-dot-product-attention kernels on CUDA; forbidden, SDPA runs its
    deterministic math kernel (slower, more memory)."""
    torch.backends.cuda.enable_flash_sdp(enabled)
    torch.backends.cuda.enable_mem_efficient_sdp(enabled)
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def get_rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only if devices match)."""
    random.setstate(_as_tuple(state["python"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuple(obj: Any) -> Any:
    """Checkpoint round-trips may turn Python's nested RNG tuple into lists; undo that."""
    if isinstance(obj, list):
        return tuple(_as_tuple(x) for x in obj)
    return obj
