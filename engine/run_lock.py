"""A run owns its folder: an exclusive lock on ``OUTPUT_DIR/.lock`` for as long as the run lives.

The lock is an ``flock`` on an open file, so the kernel releases it when the process ends in any
way (exit, crash, SIGKILL): a lock file left behind by a dead run holds no lock and the next run
takes it over. The file records who holds it (pid, host, start time, command) so that a refused
run can name the run it collides with. ``flock`` is reliable on local file systems; on network
file systems that do not support it the lock is advisory at best.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The output folder holds, or is used by, a run that this command would overwrite."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created), waiting for it: concurrent processes take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunFolderLock:
    """``RunFolderLock(folder).acquire()`` takes the folder or raises :class:`RunFolderError` naming the
    run that has it; the lock lasts until :meth:`release` or the end of the process."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> RunFolderLock:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115  (held open for the run's lifetime)
        except (FileExistsError, NotADirectoryError):
            raise RunFolderError(f"OUTPUT_DIR {folder} is a file (or lies under one); choose another OUTPUT_DIR") from None
        except OSError as err:  # read-only file system, no permission, ...
            raise RunFolderError(f"OUTPUT_DIR {folder} cannot be written ({err.strerror}); choose another "
                                 "OUTPUT_DIR") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            who = _holder(self.path)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["started"])) if "started" in who else "?"
            raise RunFolderError(
                f"OUTPUT_DIR {self.path.parent} is in use by another run (pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')}, started {since}); wait for it to finish, or choose another OUTPUT_DIR"
            ) from None
        stale = _holder(self.path)
        if stale.get("pid") not in (None, os.getpid()):
            logger.info("took over the lock of %s left by an earlier run (pid %s), which is no longer running",
                        self.path.parent, stale["pid"])
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "command": " ".join(sys.argv)}, handle)
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Give the folder up (the lock file stays; it no longer holds a lock)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
