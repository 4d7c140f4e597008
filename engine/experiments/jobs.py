"""Running training commands as subprocesses: one at a time or side by side, each pinned to its CPU share.

A run pinned to a set of CPUs sees only those, so its data-loader default (``DATALOADER.NUM_WORKERS -1``)
and thread pools size themselves to its share. Under a time limit (a GPU lease, a batch job) a run is
started only if it is expected to end in time; runs already going are never stopped.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the error of a run that ``run_jobs`` did not start because it would end after the time limit
NOT_STARTED = "not started: it would not end within --time-limit"


@dataclass
class Job:
    """One run to execute: ``key`` files its error, ``name`` is how progress lines call it, ``announce`` is
    printed when it starts."""

    key: Hashable
    name: str
    command: list[str]
    announce: str = ""


@dataclass
class Outcome:
    """How a command ended: its exit status, and its last error line (``None`` when it succeeded)."""

    returncode: int
    error: str | None


def cpu_slots(jobs: int) -> list[set[int] | None]:
    """Split this process's CPUs into ``jobs`` disjoint sets of equal size (``None`` each when there is one
    job, fewer CPUs than jobs, or no CPU affinity on this system)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [None] * jobs
    if jobs <= 1 or len(cpus) < jobs:
        return [None] * jobs
    k = len(cpus) // jobs
    return [set(cpus[i * k:(i + 1) * k]) for i in range(jobs)]


def execute(command: list[str], cpus: set[int] | None = None, env: Mapping[str, str] | None = None,
            capture: bool = True) -> Outcome:
    """Run ``command`` in the repository root, pinned to ``cpus`` (and ``OMP_NUM_THREADS`` set to their
    number), with ``env`` added to this process's environment. ``capture`` keeps its output (the error is
    its last stderr line); otherwise it prints to this terminal (the error is its exit status)."""
    full_env = {**os.environ, **(env or {})}
    if cpus:
        full_env["OMP_NUM_THREADS"] = str(len(cpus))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # a syscall only: safe after fork
    proc = subprocess.run(command, cwd=REPO, capture_output=capture, text=True, env=full_env, preexec_fn=pin)
    if proc.returncode == 0:
        return Outcome(0, None)
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return Outcome(proc.returncode, lines[-1] if lines else f"exit {proc.returncode}")


def run_jobs(jobs: list[Job], parallel: int = 1, time_limit: float | None = None, run_seconds: float = 0.0,
             env: Mapping[str, str] | None = None) -> dict[Hashable, str]:
    """Run ``jobs``, ``parallel`` at a time, each on its :func:`cpu_slots` share, output captured; returns the
    errors by ``Job.key`` (empty when every run succeeded).

    With ``time_limit`` (seconds from now), a run is not started unless it is expected to end in time:
    expected to take as long as the longest run finished so far (``run_seconds`` before any has). Those not
    started get the error :data:`NOT_STARTED` and run on the next call.
    """
    errors: dict[Hashable, str] = {}
    slots: queue.Queue = queue.Queue()
    for cpus in cpu_slots(parallel):
        slots.put(cpus)
    done, longest = 0, float(run_seconds)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    lock = threading.Lock()

    def one(job: Job) -> None:
        nonlocal done, longest
        cpus = slots.get()
        with lock:
            late = deadline is not None and time.monotonic() + longest > deadline
            if late:
                done += 1
                errors[job.key] = NOT_STARTED
                print(f"[{done}/{len(jobs)}] {job.name}: not started (--time-limit; about {longest:.0f} s a run)",
                      flush=True)
            elif job.announce:
                print(job.announce, flush=True)
        if late:
            slots.put(cpus)
            return
        start = time.perf_counter()
        try:
            outcome = execute(job.command, cpus, env)
        finally:
            slots.put(cpus)
        took = time.perf_counter() - start
        with lock:
            done += 1
            if outcome.error is not None:
                errors[job.key] = outcome.error
            else:
                longest = max(longest, took)
            state = "ok" if outcome.error is None else f"FAILED: {outcome.error}"
            print(f"[{done}/{len(jobs)}] {job.name}: {state} ({took:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, jobs))
    return errors
