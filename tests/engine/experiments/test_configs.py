"""engine/experiments/configs.py: what a run trains, from a command line or from its folder, without the keys
that only name it."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.config import load_config
from engine.experiments.configs import command_config, folder_config, trained_config

REPO = Path(__file__).resolve().parents[3]
TINY = "configs/synthetic/DeMo_SDTPS_tiny.yml"


def test_the_run_s_name_is_left_out_and_its_seed_kept() -> None:
    a = trained_config(REPO / TINY, ["OUTPUT_DIR", "x", "WANDB.NAME", "a", "SEED", "1"])
    b = trained_config(REPO / TINY, ["OUTPUT_DIR", "y", "WANDB.NAME", "b", "SEED", "1"])
    assert a == b and "OUTPUT_DIR" not in a and "WANDB" not in a
    assert trained_config(REPO / TINY, ["SEED", "2"]) != a
    assert trained_config(REPO / "configs" / "nope.yml", []) is None  # cannot be read: nothing to compare


def test_a_command_s_flags_count_as_their_keys(tmp_path: Path) -> None:
    """``--init_scale 0.7`` of train_net.py trains what ``MODEL.SDTPS.GATE_INIT_SCALE 0.7`` trains, and a run
    folder's config.yaml describes what its command trained."""
    flags = [sys.executable, "train_net.py", "--config_file", TINY, "--init_scale", "0.7", "SEED", "3",
             "OUTPUT_DIR", str(tmp_path / "a")]
    keys = [sys.executable, "train_net.py", "--config_file", TINY, "MODEL.SDTPS.GATE_INIT_SCALE", "0.7", "SEED", "3"]
    assert command_config(flags) == command_config(keys) is not None
    assert command_config(flags) != command_config([*keys[:-1], "4"])
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(REPO / TINY, keys[4:] + ["OUTPUT_DIR", str(run_dir)]).dump())
    assert folder_config(run_dir) == command_config(flags)
