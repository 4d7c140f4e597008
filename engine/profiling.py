"""A torch.profiler trace of the first steps of one training epoch (``MONITOR.PROFILE_EPOCH``).

The step alone (``tools/benchmark.py --task train --profile``) shows what the model costs; this shows what the training
loop adds around it: waiting for the loader, launching a step, judging the step before, logging. The loop
marks those parts with :func:`torch.profiler.record_function` ranges, so they are named in the trace.
``MONITOR.PROFILE_STEPS`` steps are recorded after one warm-up step; the trace (Chrome format, gzipped: open
it in https://ui.perfetto.dev or chrome://tracing) and a table of the operations by time are written to
``<run folder>/profile/``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch.profiler import ProfilerActivity, profile, schedule

logger = logging.getLogger(__name__)


class StepProfiler(Protocol):
    def step(self) -> None:
        """Mark the end of one training step."""


class _Off:
    def step(self) -> None:
        pass


def _write(out_dir: Path, name: str, on_cuda: bool):
    """The profiler's ``on_trace_ready``: the trace and the operation table under ``out_dir``."""
    def ready(prof: profile) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        trace = out_dir / f"{name}.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
        (out_dir / f"{name}.ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        logger.info("profile of %s written: %s and %s", name, trace, out_dir / f"{name}.ops.txt")
    return ready


@contextlib.contextmanager
def epoch_profiler(epoch: int, profile_epoch: int, steps: int, out_dir: Path, name: str,
                   device: torch.device) -> Iterator[StepProfiler]:
    """Inside, ``step()`` after each training step. Records steps 2 to ``steps + 1`` of the epoch when ``epoch``
    (0-based) is ``profile_epoch - 1``; otherwise does nothing."""
    if profile_epoch <= 0 or epoch != profile_epoch - 1 or steps <= 0:
        yield _Off()
        return
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=_write(out_dir, name, on_cuda)) as prof:
        yield prof
