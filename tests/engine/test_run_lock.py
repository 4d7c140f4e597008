"""A run owns its folder: a second run there is refused naming the first; a dead run's lock is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.run_lock import LOCK_FILE, RunFolderError, RunFolderLock

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"


def test_second_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = RunFolderLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()} "):
        RunFolderLock(tmp_path / "run").acquire()
    first.release()
    RunFolderLock(tmp_path / "run").acquire().release()  # free again once released


def test_lock_of_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": 0}))
    lock = RunFolderLock(folder).acquire()
    assert "left by an earlier run (pid 999999999 on elsewhere), which is no longer running" in lock.took_over
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_forked_child_does_not_keep_the_lock_of_its_dead_parent(tmp_path: Path) -> None:
    """A run's loader workers are forked: they close their copy of the lock at once, so a run killed with -9
    frees its folder even while its workers live on for a moment."""
    folder = tmp_path / "run"
    # the child says it is running (its at-fork handlers have run) before the holder reports it: otherwise a
    # busy machine may kill the holder before the child has been scheduled at all
    code = ("import os, sys, time; from engine.run_lock import RunFolderLock; "
            f"lock = RunFolderLock({str(folder)!r}).acquire(); "
            "r, w = os.pipe(); child = os.fork()\n"
            "if child == 0:\n    os.write(w, b'x'); time.sleep(30); os._exit(0)\n"
            "os.read(r, 1); print(child, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunFolderError, match="in use by another run"):
            RunFolderLock(folder).acquire()
        holder.kill()  # kill -9 of the run; its child lives on
        holder.wait()
        os.kill(child, 0)  # still there
        lock = RunFolderLock(folder).acquire()
        assert f"(pid {holder.pid} " in lock.took_over
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)


def test_training_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path: Path, tiny_rgbnt_root: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.run_lock import RunFolderLock; "
         f"lock = RunFolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "log.txt").write_text("the first run's log\n")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        second = subprocess.run(
            [sys.executable, "train_net.py", "--config_file", str(TINY), "OUTPUT_DIR", str(out), "WANDB.MODE",
             "disabled", "DATASETS.ROOT_DIR", str(tiny_rgbnt_root)],
            cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert f"in use by another run (pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing replaced
    time.sleep(0.1)
    RunFolderLock(out).acquire().release()  # the holder is gone: the folder is free


def test_an_output_dir_that_cannot_be_written_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import errno

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunFolderError, match=r"cannot be written \(Read-only file system\); choose another"):
        RunFolderLock(tmp_path / "run").acquire()


def test_the_take_over_line_reaches_the_console_and_the_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": 0}))
    res = subprocess.run([sys.executable, "train_net.py", "--config_file", str(TINY), "--resume", "OUTPUT_DIR", str(out),
                          "WANDB.MODE", "disabled"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no checkpoint in" in res.stderr  # it went on past the lock
    line = "took over the lock of"
    assert line in res.stdout + res.stderr and line in (out / "log.txt").read_text()
