"""engine/experiments/commands.py: a run's command line, in the order the training scripts read it."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.experiments.commands import interrupted, sweep_command, table_command, with_resume

SPEC = {"script": "train_net.py", "_name": "toy", "quick": ["SOLVER.MAX_EPOCHS", 4]}
ROW = {"label": "new init 0.5/0.5", "config": "c.yml", "quick_config": "q.yml", "args": ["--init_scale", 0.5],
       "overrides": ["MODEL.X", ["MODEL.Y", 2]]}


def test_table_command_order(tmp_path: Path) -> None:
    run_dir = tmp_path / "seed1"
    cmd = table_command(SPEC, ROW, 1, run_dir, quick=True, real=False, wandb_mode="disabled", extra=["K", "V"])
    assert cmd == [sys.executable, "train_net.py", "--config_file", "q.yml", "--init_scale", "0.5",
                   "MODEL.X", "MODEL.Y", "2", "SOLVER.MAX_EPOCHS", "4", "K", "V", "SEED", "1", "OUTPUT_DIR", str(run_dir),
                   "WANDB.MODE", "disabled", "WANDB.GROUP", "ablation-toy", "WANDB.NAME", "new_init_0.5_0.5-seed1"]


def test_an_interrupted_run_resumes_before_its_overrides(tmp_path: Path) -> None:
    run_dir = tmp_path / "seed0"
    run_dir.mkdir()
    assert not interrupted(run_dir)
    (run_dir / "last_checkpoint").write_text("checkpoint_epoch0001.pth")
    assert interrupted(run_dir)
    cmd = table_command(SPEC, ROW, 0, run_dir, quick=False, real=False, wandb_mode="offline")
    assert cmd[2:7] == ["--config_file", "c.yml", "--init_scale", "0.5", "--resume"] and cmd[7] == "MODEL.X"
    (run_dir / "summary.json").write_text("{}")
    assert not interrupted(run_dir)  # finished: nothing to resume


def test_sweep_command_macros() -> None:
    spec = {"program": "train_net.py", "command": ["${env}", "${interpreter}", "${program}", "--config_file", "c.yml",
                                                   "${args}", "${args_no_hyphens}", "${args_no_boolean_flags}"]}
    params = {"a": 1, "on": True, "off": False}
    cmd = sweep_command(spec, params, ["OUTPUT_DIR", "o"])
    assert cmd == [sys.executable, "train_net.py", "--config_file", "c.yml", "--a=1", "--on=True", "--off=False",
                   "a=1", "on=True", "off=False", "--a=1", "--on", "OUTPUT_DIR", "o"]
    default = sweep_command({"program": "p.py"}, {"x": 2}, [])  # W&B's default command
    assert default == [sys.executable, "p.py", "--x=2"]
    assert sweep_command({"command": ["python3", "p.py"]}, {}, [])[0] == sys.executable


def test_resume_goes_right_after_the_script() -> None:
    assert with_resume(["py", "train_net.py", "--x=1", "K", "V"]) == ["py", "train_net.py", "--resume", "--x=1", "K", "V"]
