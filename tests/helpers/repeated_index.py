"""A dispatch-mode watch for accumulating index_put calls whose index repeats (non-reproducible backward on CPU)."""

from __future__ import annotations

import torch


class RepeatedIndexWatch:
    """Records every accumulating index_put whose index repeats: its backward-time additions into one place run
    as CPU atomics in thread order, so a run would not reproduce bit for bit."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        repeated = self.repeated = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
                if func.__name__.split(".")[0] in ("index_put", "index_put_", "_index_put_impl_") and accumulate:
                    index = torch.stack(torch.broadcast_tensors(*[i for i in args[1] if i is not None])).flatten(1)
                    if torch.unique(index, dim=1).shape[1] < index.shape[1]:
                        repeated.append(tuple(args[0].shape))
                return func(*args, **kwargs)

        self.mode = Mode()
