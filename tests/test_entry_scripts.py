"""The two entry scripts: argument handling, run-folder protection, registry errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_train_net_writes_resolved_config_with_gate_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text("MODEL:\n  NAME: NoSuchModel\n")
    out = tmp_path / "run"
    res = _run("train_net.py", "--config_file", str(cfg_file), "--init_scale", "0.3", "--init_bias", "0.7",
               "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled")
    assert res.returncode == 2
    assert "not implemented yet: model 'NoSuchModel'" in res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["MODEL"]["SDTPS"]["GATE_INIT_SCALE"] == 0.3 and saved["MODEL"]["SDTPS"]["GATE_INIT_BIAS"] == 0.7
    assert (out / "log.txt").is_file()


def test_bad_inputs_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    res = _run("train_b1_improvement.py", "--config_file", str(tmp_path / "missing.yml"))
    assert res.returncode == 2 and "config file not found" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("SOLVER:\n  BASE_LRR: 1.0\n")
    res = _run("train_b1_improvement.py", "--config_file", str(bad))
    assert res.returncode == 2 and "SOLVER.BASE_LRR" in res.stderr and str(bad) in res.stderr


def test_finished_or_unfinished_run_folder_is_protected(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    res = _run("train_net.py", "OUTPUT_DIR", str(out))
    assert res.returncode == 2 and "already holds a finished run" in res.stderr
    (out / "summary.json").unlink()
    (out / "checkpoint_epoch0003.pth").write_bytes(b"x")
    res = _run("train_net.py", "OUTPUT_DIR", str(out))
    assert res.returncode == 2 and "unfinished run" in res.stderr and "--resume" in res.stderr
    assert (out / "checkpoint_epoch0003.pth").read_bytes() == b"x"
