"""A run owns its folder: a second run there is refused naming the first; a dead run's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.run_lock import LOCK_FILE, RunFolderError, RunFolderLock

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"


def test_second_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = RunFolderLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()} "):
        RunFolderLock(tmp_path / "run").acquire()
    first.release()
    RunFolderLock(tmp_path / "run").acquire().release()  # free again once released


def test_lock_of_a_dead_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": 0}))
    with caplog.at_level(logging.INFO, logger="engine.run_lock"):
        lock = RunFolderLock(folder).acquire()
    assert "left by an earlier run (pid 999999999)" in caplog.text
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


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
