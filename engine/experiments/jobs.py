"""Running training commands as subprocesses: one at a time or side by side, each pinned to its CPU share and,
on a machine with GPUs, to one GPU.

A run pinned to a set of CPUs sees only those, so its data-loader default (``DATALOADER.NUM_WORKERS -1``)
and thread pools size themselves to its share. Side-by-side runs take the GPUs in turn (run slot ``i`` on
``gpus[i % len(gpus)]``, through ``CUDA_VISIBLE_DEVICES``), so ``--jobs 6`` on two GPUs puts three runs on
each (under MPS, if it runs, they share each GPU's compute). Under a time limit (a GPU lease, a batch job) a run is
started only if it is expected to end in time; runs already going are never stopped.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from utils.environment import multicast_off

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


def visible_gpus() -> list[str]:
    """The GPUs this process may use: the entries of ``CUDA_VISIBLE_DEVICES`` where it is set, else every device
    torch counts; ``[]`` without CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def parse_gpus(text: str) -> list[str]:
    """``--gpus``: ``all`` (:func:`visible_gpus`), ``none`` (no GPU is assigned: runs see what this process sees),
    or a comma-separated list of device ids (``0,1``)."""
    if text == "all":
        return visible_gpus()
    if text in ("none", ""):
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus must be all, none or device ids like 0,1; got {text!r}")
    return gpus


def gpu_slots(parallel: int, gpus: Sequence[str]) -> list[str | None]:
    """The GPU of each of ``parallel`` run slots: the GPUs in turn (``None`` each without GPUs)."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(parallel)]


def execute(command: list[str], cpus: set[int] | None = None, env: Mapping[str, str] | None = None,
            capture: bool = True) -> Outcome:
    """Run ``command`` in the repository root, pinned to ``cpus`` (and ``OMP_NUM_THREADS`` set to their
    number), with ``env`` added to this process's environment. ``capture`` keeps its output (the error is
    its last stderr line); otherwise it prints to this terminal (the error is its exit status)."""
    full_env = multicast_off({**os.environ, **(env or {})})
    if cpus:
        full_env["OMP_NUM_THREADS"] = str(len(cpus))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # a syscall only: safe after fork
    proc = subprocess.run(command, cwd=REPO, capture_output=capture, text=True, env=full_env, preexec_fn=pin)
    if proc.returncode == 0:
        return Outcome(0, None)
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return Outcome(proc.returncode, lines[-1] if lines else f"exit {proc.returncode}")


def run_jobs(jobs: list[Job], parallel: int = 1, time_limit: float | None = None, run_seconds: float = 0.0,
             env: Mapping[str, str] | None = None, gpus: Sequence[str] = ()) -> dict[Hashable, str]:
    """Run ``jobs``, ``parallel`` at a time, each on its :func:`cpu_slots` share and its :func:`gpu_slots` GPU
    (``CUDA_VISIBLE_DEVICES``), output captured; returns the errors by ``Job.key`` (empty when every run
    succeeded).

    With ``time_limit`` (seconds from now), a run is not started unless it is expected to end in time:
    expected to take as long as the longest run finished so far (``run_seconds`` before any has). Those not
    started get the error :data:`NOT_STARTED` and run on the next call.
    """
    errors: dict[Hashable, str] = {}
    slots: queue.Queue = queue.Queue()
    for slot in zip(cpu_slots(parallel), gpu_slots(parallel, gpus)):
        slots.put(slot)
    done, longest = 0, float(run_seconds)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    lock = threading.Lock()

    def one(job: Job) -> None:
        nonlocal done, longest
        slot = slots.get()
        cpus, gpu = slot
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
            slots.put(slot)
            return
        start = time.perf_counter()
        try:
            outcome = execute(job.command, cpus, {**(env or {}), **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})})
        finally:
            slots.put(slot)
        took = time.perf_counter() - start
        with lock:
            done += 1
            if outcome.error is not None:
                errors[job.key] = outcome.error
            else:
                longest = max(longest, took)
            state = "ok" if outcome.error is None else f"FAILED: {outcome.error}"
            where = f", GPU {gpu}" if gpu else ""
            print(f"[{done}/{len(jobs)}] {job.name}: {state} ({took:.0f} s{where})", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, jobs))
    return errors
