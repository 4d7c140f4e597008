"""Reading finished runs back: the values of a run's ``summary.json``, a table row over its seeds, and finished
runs that another row or table can reuse.

A training run writes ``summary.json`` last, so its presence marks the run finished; a folder without it
holds a run that failed, was interrupted or has not run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: written last by a training run that finished (the scalar results by name)
SUMMARY = "summary.json"
#: written into a run folder copied from another run, naming the source
REUSED_FROM = "REUSED_FROM"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished run, ``None`` when the run did not finish."""
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def read_metric(run_dir: Path, metric: str) -> float | None:
    """A sweep's ``metric`` from a finished run (``test/mAP`` also matches ``mAP``); ``None`` if absent."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    for key in (metric, metric.split("/", 1)[-1]):
        if key in summary:
            return float(summary[key])
    return None


def collect_row(label: str, columns: list[str], run_dirs: Mapping[int, Path], failed: Mapping[int, str],
                feature: str = "", expect_finished: bool = True) -> dict[str, Any]:
    """One table row from its runs: ``{"label", "values": {column: {seed: value}}, "errors": [...]}``.

    ``run_dirs`` and ``failed`` are by seed (``failed``: the runner's error of a seed). ``feature`` reads
    ``<feature>/<column>`` (a retrieval feature other than the default), and a missing key is an error.
    With ``expect_finished``, a run without ``summary.json`` is an error; otherwise (rendering what finished
    elsewhere) it is just not counted.
    """
    result: dict[str, Any] = {"label": label, "values": {c: {} for c in columns}, "errors": []}
    prefix = f"{feature}/" if feature else ""
    for seed, run_dir in run_dirs.items():
        if seed in failed:
            result["errors"].append(f"seed {seed}: {failed[seed]}")
            continue
        summary = read_summary(run_dir)
        if summary is None:
            if expect_finished:
                result["errors"].append(f"seed {seed}: finished without {SUMMARY}")
            continue
        for c in columns:
            if prefix + c in summary:
                result["values"][c][seed] = float(summary[prefix + c])
            elif prefix:
                result["errors"].append(f"seed {seed}: no '{prefix + c}' in {run_dir / SUMMARY}")
    return result


def finished_runs(root: Path, describe: Callable[[Path], str | None]) -> dict[str, Path]:
    """Every finished run of every table under ``root`` (``<table>/<row>/seed<k>``), by ``describe(run_dir)``
    (what it trained; runs it cannot describe are left out); the first folder of each description wins."""
    found: dict[str, Path] = {}
    for summary in sorted(Path(root).glob(f"*/*/seed*/{SUMMARY}")):
        text = describe(summary.parent)
        if text is not None:
            found.setdefault(text, summary.parent)
    return found


def reuse_run(source: Path, run_dir: Path) -> None:
    """Make ``run_dir`` a finished copy of the run in ``source`` (its files, checkpoints left out), with a
    ``REUSED_FROM`` file naming the source."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".pth" and path.name != SUMMARY:
            shutil.copy2(path, run_dir / path.name)
    (run_dir / REUSED_FROM).write_text(f"{source}\n")
    shutil.copy2(source / SUMMARY, run_dir / SUMMARY)  # last: marks the copy finished
