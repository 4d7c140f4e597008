"""engine/experiments as a package: a runner only runs scripts and reads files, so importing it loads no model
family (no model, no family package of the engine, no synthetic data generator)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODULES = sorted(p.stem for p in (REPO / "engine" / "experiments").glob("*.py") if p.stem != "__init__")


def test_the_package_imports_no_model_family() -> None:
    assert {"collect", "commands", "configs", "grid", "jobs", "specs", "stats", "tables"} <= set(MODULES)
    code = ("import sys\n"
            f"for name in {MODULES!r}:\n"
            "    __import__('engine.experiments.' + name)\n"
            "bad = sorted(m for m in sys.modules if m == 'modeling' or m.startswith(('modeling.', 'engine.reid',"
            " 'engine.fewshot', 'datasets.synthetic')))\n"
            "print(bad)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
