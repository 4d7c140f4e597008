"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from utils.errors import UserError


class DiskFullError(UserError, OSError):
    """A write ran out of space; the file it was replacing is intact."""


def _is_disk_full(err: BaseException, directory: Path) -> bool:
    """``err`` came from a full disk: ENOSPC / EDQUOT, or torch's zip writer failing where no space is left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, RuntimeError) and "write" in str(err).lower():
        with contextlib.suppress(OSError):
            return shutil.disk_usage(directory).free < 64 * 2**20
    return False


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on clean exit fsync and rename it over ``path``.

    If the body raises (or the process dies), ``path`` keeps its previous content
    and the temporary file is removed (or left with a ``.tmp`` suffix after a kill,
    which no reader looks at).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_full(err, path.parent):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; the previous "
                                f"{path.name} (if any) is intact: free some space, then --resume") from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a binary temp file, then atomically move it to ``path``."""
    with atomic_open(path, "wb") as handle:
        write(handle)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_error_summary(err: BaseException) -> str:
    """One line for an error raised while loading a file: its first line, without torch's advice to
    unpickle arbitrary code (``weights_only=False``), which is unsafe for a file of unknown origin."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(" In PyTorch 2.6")[0].rstrip(". ")
    return f"{type(err).__name__}: {text}" if text else f"{type(err).__name__} (an empty or truncated file?)"


def fresh_folder(parent: str | Path, name: str) -> Path:
    """Create and return ``parent/name``, or ``name-2``, ``name-3`` ... where that exists: a new, empty folder
    (what a command adds beside earlier results never replaces them)."""
    for i in range(1, 10_000):
        path = Path(parent) / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent} already holds {name} and {name}-2 to {name}-9999")
