"""How long the training loop waits for its data: the host time spent getting each next batch.

An epoch that runs slower than the model step alone (``tools/benchmark.py --task train``) either waits for the data
loader or loses time elsewhere in the loop; this tells the two apart. The time counted is the time the
loop is blocked in the loader's ``next()``, the first batch of the epoch (filling the pipeline) included;
that first wait is also kept apart, since it is paid once per epoch however fast the loader runs after.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class DataWait:
    """Iterate ``batches`` and add up, in ``seconds``, the time spent waiting for each one; ``first_seconds`` is
    the part spent waiting for the first batch.

    ``len()`` is the wrapped iterable's; both start at 0 for every new iteration.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.seconds = 0.0
        self.first_seconds = 0.0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        self.seconds = self.first_seconds = 0.0
        it, end = iter(self.batches), object()
        first = True
        while True:
            started = time.perf_counter()
            with torch.profiler.record_function("wait for data"):  # named in a MONITOR.PROFILE_EPOCH trace
                batch = next(it, end)
            waited = time.perf_counter() - started
            self.seconds += waited
            if first:
                self.first_seconds, first = waited, False
            if batch is end:
                return
            yield batch
