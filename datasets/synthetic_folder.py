"""The folder contract of the synthetic sets: written atomically, trusted only when complete.

A generator fills a temporary sibling of its output folder and renames it into place; the
sentinel ``.synthetic`` marks a folder as ours (so a foreign folder is never replaced) and
the marker ``.complete`` (the generator arguments as JSON) is written last, so a
half-written folder is never trusted. The dataset classes use the same marker to find a
generated folder and to decide whether it must be generated again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets.bases import DatasetLayoutError

logger = logging.getLogger(__name__)

MARKER = ".complete"
SENTINEL = ".synthetic"


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The generator arguments recorded in ``folder/.complete``, or ``None`` if absent/unreadable."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out: Path) -> None:
    """Raise :class:`FileExistsError` unless ``out`` is absent, empty or written by a generator."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SENTINEL).exists():
        raise FileExistsError(
            f"{out} exists, is not empty and was not written by datasets.synthetic; refusing to replace it. "
            "Remove it or choose another --out."
        )


def write_atomically(out: Path, marker: dict, fill: Callable[[Path], None], force: bool = False) -> bool:
    """Create ``out`` by ``fill(tmp)`` in a temporary sibling, then rename it into place.

    Returns False (and writes nothing) when ``out`` already holds a complete folder with the
    same marker, unless ``force``. A folder of ours that is incomplete or has other
    arguments is replaced; a foreign non-empty folder is never touched.
    """
    out = Path(out)
    if not force and read_marker(out) == marker:
        return False
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / SENTINEL).write_text("written by datasets.synthetic\n")
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            if read_marker(out) == marker and not force:  # another process finished first
                return False
            _check_replaceable(out)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if read_marker(out) == marker:  # a concurrent writer (e.g. another DDP rank) won the race
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def synthetic_dir(root: str, default_name: str) -> Path:
    """The generator folder: ``root`` itself if it is one (marker present or named
    ``default_name``), else ``root/default_name``."""
    root_path = Path(root).expanduser()
    if (root_path / MARKER).exists() or (root_path / SENTINEL).exists() or root_path.name == default_name:
        return root_path
    return root_path / default_name


def requested_args(
    name: str, presets: dict[str, dict], preset: str | None, overrides: dict, **defaults: object
) -> tuple[dict, bool]:
    """Generator arguments of a synthetic set: the ``preset``'s (``'small'`` if ``None``), then
    ``defaults``, then the ``overrides`` that are not ``None``; and whether any was given explicitly."""
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown {name} preset '{preset}' (choose from {sorted(presets)})")
    explicit = preset is not None or any(v is not None for v in overrides.values())
    requested = dict(presets[preset or "small"], **defaults)
    requested.update({k: v for k, v in overrides.items() if v is not None})
    return requested, explicit


def ensure_generated(
    base: Path, kind: str, requested: dict[str, Any], explicit: bool, generate: bool, fn: Callable[..., bool]
) -> None:
    """Generate ``base`` with ``fn(base, **requested)`` unless a complete folder is there.

    A complete folder is kept as it is unless generator arguments were given explicitly
    (``explicit``) and differ from the ones recorded in its marker. Without ``generate`` a
    missing or outdated folder is a :class:`DatasetLayoutError` naming the command to run.
    """
    marker = read_marker(base)
    if marker is not None and not explicit:
        return
    if marker is not None:
        recorded = {k: marker.get(k) for k in requested}
        wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in requested.items()}
        if recorded == wanted:
            return
    if not generate:
        raise DatasetLayoutError(
            f"{base} holds no complete synthetic data set; run "
            f"'python -m datasets.synthetic --kind {kind} --out {base}' or pass generate=True"
        )
    start = time.perf_counter()
    fn(base, **requested)
    logger.info("generated synthetic %s data in %s (%.1f s)", kind, base, time.perf_counter() - start)
