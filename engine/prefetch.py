"""Batches copied to the GPU one step ahead, on a side stream, so the copy overlaps the previous step.

Without it, a step's host-to-device copy (64 triplets of 3 x 256 x 128 float images: 75 MB) starts only
after the previous step's host sync and the GPU waits for it. With it, batch ``k + 1`` is issued on a
copy stream before batch ``k`` is handed to the step; the compute stream waits for that copy only when
batch ``k + 1`` is used. On the CPU (and with ``DATALOADER.PREFETCH_TO_DEVICE False``) batches are moved
when they are used, as before. The batches and their values are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def _record(batch: Any, stream: torch.cuda.Stream) -> None:
    """Mark every CUDA tensor of ``batch`` as used by ``stream`` (the caching allocator must not reuse its
    memory before ``stream`` is done with it: it was allocated on the copy stream)."""
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record(value, stream)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _record(value, stream)


class DevicePrefetcher:
    """Iterate ``batches`` as ``to_device(batch)``, each copied on a side CUDA stream one batch ahead.

    ``len()`` is the loader's. ``enabled=False`` or a non-CUDA ``device`` moves each batch when it is used.
    """

    def __init__(self, batches: Iterable[Any], to_device: Callable[[Any], Any], device: torch.device,
                 enabled: bool = True) -> None:
        self.batches, self.to_device, self.device = batches, to_device, device
        self.enabled = enabled and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if not self.enabled:
            for batch in self.batches:
                yield self.to_device(batch)
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def issue(batch: Any) -> Any:
            with torch.cuda.stream(copy_stream):
                return self.to_device(batch)

        def ready(batch: Any) -> Any:
            compute.wait_stream(copy_stream)
            _record(batch, compute)
            return batch

        it = iter(self.batches)
        try:
            pending = issue(next(it))
        except StopIteration:
            return
        for batch in it:
            current, pending = ready(pending), issue(batch)
            yield current
        yield ready(pending)
