"""Environment variables the repository's launchers set for the processes they start (no torch import here)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: NVLink multicast (NVLS) off for NCCL, symmetric memory and NVSHMEM: the multi-GPU hosts this repository runs on
#: do not support it; a value the user set is kept
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """``env`` (default: this process's environment, changed in place) with :data:`MULTICAST_OFF` where unset."""
    target = os.environ if env is None else env
    for key, value in MULTICAST_OFF.items():
        target.setdefault(key, value)
    return target
