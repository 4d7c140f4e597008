"""Run the same ``main()`` on a CPU, one GPU, or N GPUs under ``torchrun`` (DDP) with no code change."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.distributed import get_world_size
from utils.environment import multicast_off

logger = logging.getLogger(__name__)
R = TypeVar("R")

def launch(main: Callable[..., R], *args: Any, timeout_minutes: float = 30.0) -> R:
    """Call ``main(*args)``, inside a process group when started by torchrun.

    torchrun sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; with ``WORLD_SIZE`` > 1 this
    joins the group (NCCL on GPUs, Gloo on CPUs), pins this rank's GPU, runs
    ``main`` and tears the group down even if ``main`` raises.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return main(*args)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        multicast_off()
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    try:
        return main(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs; else return it."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )
