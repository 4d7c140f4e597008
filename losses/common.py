"""Small helpers shared by the losses: stats conversion and gradient-carrying zeros.

Stats policy (every loss in this package): ``stats`` is a ``dict[str, float]`` as the
public SDM signature promises (``host_stats=False`` returns detached tensors instead, for
training loops that must not sync with the device each step). All of a call's statistics are gathered as detached
0-d tensors and moved to the host in **one** transfer (:func:`stats_to_floats`), so a
loss costs at most one host sync per call, never one per statistic.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def stats_to_floats(stats: Mapping[str, torch.Tensor | float | int]) -> dict[str, float]:
    """Convert a mapping of 0-d tensors / numbers to floats with a single device->host copy."""
    names = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
    if names:
        stacked = torch.stack([stats[k].detach().reshape(()).to(torch.float32) for k in names])
        out.update(zip(names, stacked.cpu().tolist()))
    return {k: out[k] for k in stats}


def finish_stats(stats: Mapping[str, torch.Tensor | float | int], host: bool) -> dict[str, torch.Tensor | float]:
    """``stats`` as host floats (one transfer), or, with ``host=False``, as detached device tensors.

    Training loops pass ``host_stats=False`` to the losses so that a step has no host sync
    beyond the one it chooses to make; they convert at logging time.
    """
    if host:
        return stats_to_floats(stats)
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def zero_with_grad(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 0-d zero connected to every input's graph (so ``backward()`` works, grads are 0).

    Uses ``nan_to_num`` so that non-finite entries in the inputs cannot turn the zero into NaN.
    """
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        total = total + torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0
    return total
