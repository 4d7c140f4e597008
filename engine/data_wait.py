"""How long the training loop waits for its data: the host time spent getting each next batch.

An epoch that runs slower than the model step alone (``tools/benchmark.py``) either waits for the data
loader or loses time elsewhere in the loop; this tells the two apart. The time counted is the time the
loop is blocked in the loader's ``next()``, the first batch of the epoch (filling the pipeline) included.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any


class DataWait:
    """Iterate ``batches`` and add up, in ``seconds``, the time spent waiting for each one.

    ``len()`` is the wrapped iterable's; ``seconds`` starts at 0 for every new iteration.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        self.seconds = 0.0
        it, end = iter(self.batches), object()
        while True:
            started = time.perf_counter()
            batch = next(it, end)
            self.seconds += time.perf_counter() - started
            if batch is end:
                return
            yield batch
