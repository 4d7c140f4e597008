"""engine/experiments/jobs.py: CPU shares, a command's outcome, side-by-side runs under a time limit."""

from __future__ import annotations

import sys

import pytest

from engine.experiments import jobs
from engine.experiments.jobs import NOT_STARTED, Job, cpu_slots, execute, run_jobs


def test_cpu_slots_are_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    slots = cpu_slots(5)
    assert len(slots) == 5 and all(len(s) == 3 for s in slots)
    assert len(set().union(*slots)) == 15  # disjoint
    assert cpu_slots(1) == [None]  # one job keeps every CPU
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_slots(2) == [None, None]  # fewer CPUs than jobs: no pinning


def test_a_failing_command_reports_its_last_error_line() -> None:
    ok = execute([sys.executable, "-c", "print('fine')"])
    assert ok.returncode == 0 and ok.error is None
    bad = execute([sys.executable, "-c", "import sys; print('one', file=sys.stderr); print('two', file=sys.stderr); "
                   "sys.exit(3)"])
    assert bad.returncode == 3 and bad.error == "two"
    silent = execute([sys.executable, "-c", "import sys; sys.exit(4)"])
    assert silent.error == "exit 4"
    env = execute([sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['X_SEEN'] == 'yes' else 1)"],
                  env={"X_SEEN": "yes"})
    assert env.returncode == 0


def test_time_limit_starts_no_run_that_would_not_end_in_time(capsys: pytest.CaptureFixture[str]) -> None:
    """One slot, runs of over 1 s, a 1.5 s limit: the first runs, the other two would end too late."""
    nap = [sys.executable, "-c", "import time; time.sleep(1.0)"]
    tasks = [Job((0, 0), "row 0 seed 0", nap, "=== a"), Job((0, 1), "row 0 seed 1", nap), Job((1, 0), "row 1 seed 0", nap)]
    errors = run_jobs(tasks, parallel=1, time_limit=1.5, run_seconds=0.0)
    assert errors == {(0, 1): "not started: it would not end within --time-limit",
                      (1, 0): "not started: it would not end within --time-limit"}
    out = capsys.readouterr().out
    assert "=== a" in out and "row 0 seed 0: ok" in out and "row 1 seed 0: not started (--time-limit" in out
    # an estimate given up front keeps even the first run from starting
    errors = run_jobs(tasks[:1], parallel=1, time_limit=1.0, run_seconds=5.0)
    assert errors == {(0, 0): NOT_STARTED}
    # no limit: everything runs
    assert run_jobs(tasks[:2], parallel=2) == {}
