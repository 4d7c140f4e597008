"""Process-group queries and collectives that are safe to call without one.

Every function here works in a plain single-process run (world size 1) and
under ``torchrun`` alike, so models, losses and samplers can be written once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    """True on rank 0: the only process that logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce; ``flag`` itself without a
    process group)."""
    if not is_dist():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank along dim 0, keeping gradients.

    Each rank gets the global batch (world_size * B, ...) in rank order; gradients
    flowing into any slice reach the rank that produced it. Identity when not
    distributed. All ranks must pass the same shape.
    """
    if get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradients (labels, ids)."""
    if get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)
