"""What a run wrote, to show a later command left it as it was."""

from __future__ import annotations

from pathlib import Path

#: written by every command in a run folder (the command's own log lines, the folder lock, its config)
NOT_RESULTS = ("log.txt", ".lock")


def run_files(folder: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file the run wrote directly in ``folder`` (sub-folders of later
    commands, the log, the lock and extra config copies excluded)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in NOT_RESULTS and not (p.name.startswith("config.") and p.name != "config.yaml")}
