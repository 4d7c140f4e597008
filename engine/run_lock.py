"""A run owns its folder: an exclusive lock on ``OUTPUT_DIR/.lock`` for as long as the run lives.

The lock is an ``flock`` on an open file, so the kernel releases it when the process ends in any
way (exit, crash, SIGKILL): a lock file left behind by a dead run holds no lock and the next run
takes it over. Processes forked by the run (data loader workers) close their copy of the file at
once, so that they do not keep the lock alive for the seconds they outlive a killed run. The file
records who holds it (pid, host, start time, command) so that a refused run can name the run it
collides with. ``flock`` is reliable on local file systems; on network file systems that do not
support it the lock is advisory at best.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from utils.errors import UserError

LOCK_FILE = ".lock"


class RunFolderError(UserError, RuntimeError):
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


def _alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host exists (True when that cannot be told)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


#: file descriptors of the locks this process holds, closed in every child it forks
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):  # the child's copies only: the parent's lock stays
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunFolderLock:
    """``RunFolderLock(folder).acquire()`` takes the folder or raises :class:`RunFolderError` naming the
    run that has it; the lock lasts until :meth:`release` or the end of the process."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._handle: IO[str] | None = None
        #: the line to log once logging is set up, when the lock of a run that no longer runs was taken over
        self.took_over: str | None = None

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
            if who.get("host") == socket.gethostname() and not _alive(who.get("pid")):
                raise RunFolderError(
                    f"OUTPUT_DIR {self.path.parent} is still locked by processes of a run that has ended (pid "
                    f"{who.get('pid')}, started {since}, no longer running): `fuser {self.path}` lists them; "
                    "try again once they are gone") from None
            raise RunFolderError(
                f"OUTPUT_DIR {self.path.parent} is in use by another run (pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')}, started {since}); wait for it to finish, or choose another OUTPUT_DIR"
            ) from None
        handle.seek(0)
        try:
            stale = json.loads(handle.read() or "{}")
        except ValueError:
            stale = {}
        if stale.get("pid") not in (None, os.getpid()):
            self.took_over = (f"took over the lock of {self.path.parent} left by an earlier run (pid {stale['pid']} "
                              f"on {stale.get('host', '?')}), which is no longer running")
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "command": " ".join(sys.argv)}, handle)
        handle.flush()
        self._handle = handle
        _HELD.add(handle.fileno())
        return self

    def release(self) -> None:
        """Give the folder up (the lock file stays; it no longer holds a lock)."""
        if self._handle is not None:
            _HELD.discard(self._handle.fileno())
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
