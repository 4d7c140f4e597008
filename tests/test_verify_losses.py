"""The three loss/scale verify scripts run as users run them: exit 0 as shipped, exit 1 with a bug injected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "verify_sdm.py": ("old_formula", "loss >= -1e-6"),
    "verify_scale_bounds.py": ("no_clamp", "stays in [0.5, 5.0]"),
    "verify_cem.py": ("detach_input", "gradient reaches the encoder"),
}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "verify" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_verify_script_passes(script: str) -> None:
    proc = run(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[FAIL]" not in proc.stdout
    assert "all checks passed" in proc.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_verify_script_fails_on_injected_bug(script: str) -> None:
    bug, failing_check = SCRIPTS[script]
    proc = run(script, "--inject-bug", bug)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fail_lines = [line for line in proc.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(fail_lines) == 1 and failing_check in fail_lines[0], proc.stdout
