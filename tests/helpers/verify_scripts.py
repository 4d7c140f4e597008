"""Run a verify/ script as its users do (``python verify/<script>.py`` from the repository root) and judge it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_verify_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python verify/<script> *args`` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, str(REPO / "verify" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_passes(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The script exits 0 as shipped, with no ``[FAIL]`` line; returns the finished process."""
    proc = run_verify_script(script, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[FAIL]" not in proc.stdout
    return proc


def assert_one_failure(script: str, bug: str, failing_check: str, timeout: float = 300) -> None:
    """With ``--inject-bug bug`` the script exits 1 and exactly one check, the one named ``failing_check``, fails."""
    proc = run_verify_script(script, "--inject-bug", bug, timeout=timeout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fail_lines = [line for line in proc.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(fail_lines) == 1 and failing_check in fail_lines[0], proc.stdout
