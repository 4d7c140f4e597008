"""tools/sweep.py, the offline sweep runner: the grid of every shipped sweep file, options after the file, resume
after an interruption, the summary. Expansion and command macros are tested in tests/engine/experiments/."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.experiments.configs import command_config

REPO = Path(__file__).resolve().parents[2]


def test_gate_init_dry_run_lists_the_full_grid() -> None:
    res = subprocess.run([sys.executable, "tools/sweep.py", "configs/sweeps/gate_init.yaml", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("  ")]
    assert len(lines) == 3 * 3 * 2 * 2
    assert "--init_scale=1.0 --init_bias=0.0 --use_gate_norm=False --renormalize_attn=False" in lines[0]
    assert all("OUTPUT_DIR" in ln and "WANDB.MODE offline" in ln for ln in lines)
    # options after the file, and overrides after --, as the sweep files' headers write them
    res = subprocess.run([sys.executable, "tools/sweep.py", "configs/sweeps/gate_init.yaml", "--dry-run", "--",
                          "SOLVER.MAX_EPOCHS", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert all("SOLVER.MAX_EPOCHS 1" in ln for ln in res.stdout.splitlines() if ln.startswith("  "))


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


# -------------------------------------------------------------------------------------------------
# Every shipped sweep file: dry-run size and the config each run trains
# -------------------------------------------------------------------------------------------------
SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def _expected_runs(spec: dict) -> int:
    """Grid size counted from the file: the product of each parameter's number of values."""
    assert spec["method"] == "grid", "a random sweep has no fixed size; give this test its --max-runs"
    return math.prod(len(p["values"]) if "values" in p else 1 for p in spec["parameters"].values())


def _dry_run_commands(sweep_file: Path) -> list[list[str]]:
    res = subprocess.run([sys.executable, "tools/sweep.py", "--dry-run", str(sweep_file.relative_to(REPO))],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [shlex.split(ln.split(": ", 1)[1]) for ln in res.stdout.splitlines() if ln.startswith("  ")]


def _value(command: list[str], key: str) -> str:
    return command[command.index(key) + 1]


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_dry_run_size_and_every_run_config_loads(sweep_file: Path) -> None:
    """Every run's command resolves, through its script's own flags, to a config of its own (every swept value
    reaches the config), in a folder of the sweep's."""
    spec = yaml.safe_load(sweep_file.read_text())
    commands = _dry_run_commands(sweep_file)
    assert len(commands) == _expected_runs(spec)
    configs = set()
    for command in commands:
        assert Path(command[1]).name == spec["program"]
        config = REPO / _value(command, "--config_file")
        assert config.is_file(), f"{sweep_file.name}: no config file {config}"
        assert Path(_value(command, "OUTPUT_DIR")).parent == Path("outputs/sweeps") / sweep_file.stem
        text = command_config(command)  # the file plus this run's values, OUTPUT_DIR and WANDB left out
        assert text is not None, f"{sweep_file.name}: {shlex.join(command)} does not load"
        configs.add(text)
    assert len(configs) == len(commands)  # every swept value reaches the config


def _config_file(spec: dict) -> str:
    return spec["command"][spec["command"].index("--config_file") + 1]


def test_real_benchmark_sweeps_repeat_the_synthetic_grid() -> None:
    """``<name>_<benchmark>.yaml`` differs from ``<name>.yaml`` only in the config file it trains."""
    stems = {p.stem: p for p in SWEEP_FILES}
    pairs = [(stems[base], path) for path in SWEEP_FILES for base in stems if path.stem.startswith(base + "_")]
    assert {real.stem for _, real in pairs} >= {"gate_init_RGBNT201", "sap_scale_miniImageNet"}
    for synthetic_file, real_file in pairs:
        synthetic, real = (yaml.safe_load(p.read_text()) for p in (synthetic_file, real_file))
        for key in ("program", "method", "metric", "parameters"):
            assert real[key] == synthetic[key], f"{real_file.name}: '{key}' differs from {synthetic_file.name}"
        assert _config_file(synthetic).startswith("configs/synthetic/")
        assert not _config_file(real).startswith("configs/synthetic/")
        assert [t for t in real["command"] if t != _config_file(real)] == \
            [t for t in synthetic["command"] if t != _config_file(synthetic)]


def test_side_by_side_sweep_places_runs_on_the_gpus_in_turn(tmp_path: Path) -> None:
    """``--jobs 2 --gpus 0,1``: the runs go two at a time, one on each GPU; the summary is the same as in turn."""
    fake = FAKE + "(out / 'gpu.txt').write_text(__import__('os').environ.get('CUDA_VISIBLE_DEVICES', ''))\n"
    (tmp_path / "fake.py").write_text(fake)
    (tmp_path / "sweeps" / "toy").mkdir(parents=True)
    (tmp_path / "sweeps" / "toy" / "allow").write_text("")
    spec_file = tmp_path / "toy.yaml"
    spec_file.write_text(yaml.safe_dump({
        "program": str(tmp_path / "fake.py"), "method": "grid", "metric": {"name": "test/mAP", "goal": "maximize"},
        "parameters": {"x": {"values": [1.0, 2.0, 3.0, 4.0]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }))
    res = subprocess.run([sys.executable, "tools/sweep.py", str(spec_file), "--out", str(tmp_path / "sweeps"),
                          "--jobs", "2", "--gpus", "0,1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    runs = sorted((tmp_path / "sweeps" / "toy").glob("*-x=*"))
    assert len(runs) == 4 and {(r / "gpu.txt").read_text() for r in runs} == {"0", "1"}
    assert "0.4000" in (tmp_path / "sweeps" / "toy" / "summary.md").read_text()
