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


def test_gpus_are_parsed_and_taken_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.experiments.jobs import gpu_slots, parse_gpus

    assert parse_gpus("0,1") == ["0", "1"] and parse_gpus("none") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse_gpus("all") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parse_gpus("all") == []
    with pytest.raises(ValueError, match="device ids"):
        parse_gpus("first")
    assert gpu_slots(6, ["0", "1"]) == ["0", "1", "0", "1", "0", "1"]  # --jobs 6 on two GPUs: three on each
    assert gpu_slots(2, []) == [None, None]


def test_side_by_side_runs_each_see_one_gpu_of_their_slot(tmp_path) -> None:
    """Four runs, two at a time, on GPUs 0 and 1: each run sees exactly one GPU, and both GPUs are used."""
    script = ("import os, sys, pathlib; "
              "pathlib.Path(sys.argv[1]).write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))")
    batch = [Job(i, f"run{i}", [sys.executable, "-c", script, str(tmp_path / f"run{i}.txt")]) for i in range(4)]
    assert run_jobs(batch, parallel=2, gpus=["0", "1"]) == {}
    seen = [(tmp_path / f"run{i}.txt").read_text() for i in range(4)]
    assert set(seen) == {"0", "1"}
    # without GPUs to place, a run sees this process's setting unchanged
    expected = __import__("os").environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    assert run_jobs(batch[:1], parallel=1, gpus=[]) == {} and (tmp_path / "run0.txt").read_text() == expected


def test_a_run_starts_with_nvlink_multicast_off_unless_the_user_set_it(tmp_path, monkeypatch) -> None:
    script = ("import os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text(','.join(os.environ.get(k, '') for k in "
              "('NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', 'NVSHMEM_DISABLE_NVLS')))")
    for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(key, raising=False)
    assert execute([sys.executable, "-c", script, str(tmp_path / "env.txt")]).returncode == 0
    assert (tmp_path / "env.txt").read_text() == "0,1,1"
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the user's own choice is kept
    assert execute([sys.executable, "-c", script, str(tmp_path / "env.txt")]).returncode == 0
    assert (tmp_path / "env.txt").read_text() == "1,1,1"
