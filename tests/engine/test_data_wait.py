"""DataWait counts the time spent getting batches and not the time spent using them."""

from __future__ import annotations

import time
from collections.abc import Iterator

from engine.data_wait import DataWait


class _SlowLoader:
    """Four batches, each taking ``delay`` seconds to produce, the first ``first`` seconds more (the workers
    filling their queues)."""

    def __init__(self, delay: float, first: float = 0.0) -> None:
        self.delay, self.first = delay, first

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Iterator[int]:
        time.sleep(self.first)
        for k in range(4):
            time.sleep(self.delay)
            yield k


def test_counts_the_loader_time_not_the_loop_time() -> None:
    fed = DataWait(_SlowLoader(0.03))
    assert len(fed) == 4
    seen = []
    for batch in fed:
        seen.append(batch)
        time.sleep(0.1)  # the step: not waiting for data
    assert seen == [0, 1, 2, 3]
    assert 0.12 <= fed.seconds < 0.3  # 4 x 0.03 s of loading; the 0.4 s of steps are not counted


def test_each_iteration_starts_from_zero() -> None:
    fed = DataWait(_SlowLoader(0.0))
    list(fed)
    fed.seconds = 99.0
    list(fed)
    assert fed.seconds < 1.0


def test_the_first_batch_wait_is_kept_apart() -> None:
    fed = DataWait(_SlowLoader(0.0, first=0.15))
    for _ in fed:
        time.sleep(0.02)
    assert 0.15 <= fed.first_seconds <= fed.seconds < 0.15 + 0.1  # the other three batches came at once
    again = DataWait(_SlowLoader(0.0))
    list(again)
    assert again.first_seconds < 0.05
