"""Clocks and memory readings the benchmark tasks share.

CUDA work is asynchronous: a timing synchronises the device before it reads the clock, at both ends.
Peak memory is ``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak_memory` (NaN off CUDA).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat(fn: Callable[[], object], times: int, device: torch.device) -> None:
    """Call ``fn`` ``times`` times (warm-up: kernel loading, allocator, compilation), then wait for the device."""
    for _ in range(times):
        fn()
    sync(device)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` calls, the device synchronised at both ends."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def median_and_min_ms(fn: Callable[[], object], reps: int, warmup: int = 5) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn()`` in milliseconds, each call timed alone (host work, no device).

    The minimum is the cost without interference from other processes on a shared machine; the median is
    what a busy machine gives.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def reset_peak_memory(device: torch.device, empty_cache: bool = False) -> None:
    """Start a new peak-memory reading on ``device`` (and first return cached blocks, with ``empty_cache``)."""
    if device.type == "cuda":
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, unit: int = 2**30) -> float:
    """Peak allocated memory since :func:`reset_peak_memory`, in ``unit`` bytes (GiB by default); NaN off CUDA."""
    return torch.cuda.max_memory_allocated(device) / unit if device.type == "cuda" else math.nan


def device_name(device: torch.device) -> str:
    """The GPU's name, else the host processor's (``cpu`` when it has none)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
