"""Offline sweep runner: grid expansion, command macros, resume after an interruption, summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import sweep  # noqa: E402


def test_gate_init_dry_run_lists_the_full_grid() -> None:
    res = subprocess.run([sys.executable, "tools/sweep.py", "configs/sweeps/gate_init.yaml", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("  ")]
    assert len(lines) == 3 * 3 * 2 * 2
    assert "--init_scale=1.0 --init_bias=0.0 --use_gate_norm=False --renormalize_attn=False" in lines[0]
    assert all("OUTPUT_DIR" in ln and "WANDB.MODE offline" in ln for ln in lines)


def test_random_method_is_seeded_and_needs_max_runs() -> None:
    spec = {"method": "random", "program": "x.py",
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
                           "k": {"values": [1, 2, 3]}}}
    a, b = sweep.expand(spec, 5, seed=3), sweep.expand(spec, 5, seed=3)
    assert a == b and len(a) == 5 and all(1e-5 <= r["lr"] <= 1e-3 and r["k"] in (1, 2, 3) for r in a)
    with pytest.raises(sweep.SweepError, match="max-runs"):
        sweep.expand(spec, None)


FAKE = '''
import json, sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("OUTPUT_DIR") + 1])
out.mkdir(parents=True, exist_ok=True)
x = float([a for a in args if a.startswith("--x=")][0].split("=")[1])
log = pathlib.Path(out.parent / "calls.txt"); log.write_text(log.read_text() + f"{x}\\n" if log.exists() else f"{x}\\n")
if x == 2.0 and not (out.parent / "allow").exists():
    sys.exit(3)  # simulate an interrupted / failed run
(out / "summary.json").write_text(json.dumps({"mAP": x / 10}))
'''


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(tmp_path: Path) -> None:
    (tmp_path / "fake.py").write_text(FAKE)
    spec_file = tmp_path / "toy.yaml"
    spec_file.write_text(yaml.safe_dump({
        "program": str(tmp_path / "fake.py"), "method": "grid",
        "metric": {"name": "test/mAP", "goal": "maximize"},
        "parameters": {"x": {"values": [1.0, 2.0, 3.0]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }))
    out = tmp_path / "sweeps"
    first = subprocess.run([sys.executable, "tools/sweep.py", str(spec_file), "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 1  # one run failed
    calls = (out / "toy" / "calls.txt").read_text().split()
    assert calls == ["1.0", "2.0", "3.0"]
    (out / "toy" / "allow").write_text("")
    second = subprocess.run([sys.executable, "tools/sweep.py", str(spec_file), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert (out / "toy" / "calls.txt").read_text().split() == ["1.0", "2.0", "3.0", "2.0"]  # only the failed one
    table = (out / "toy" / "summary.md").read_text()
    assert "best (maximize test/mAP)" in table and "0.3000" in table
    rows = (out / "toy" / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and json.loads((out / "toy" / "002-x=3.0" / "summary.json").read_text())["mAP"] == 0.3
