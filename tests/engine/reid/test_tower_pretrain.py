"""The synthetic tower pretraining: made on first use, loaded by MODEL.PRETRAIN_PATH, reused, refused when stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.reid import build_reid_model

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"
RECIPE = REPO / "configs" / "synthetic" / "Pretrain_tower_tiny.yml"
SMALL_RUN = {"SOLVER": {"MAX_EPOCHS": 1, "EVAL_PERIOD": 1, "WARMUP_EPOCHS": 1, "IMS_PER_BATCH": 16,
                        "LOG_PERIOD": 2, "BASE_LR": 1.0e-3},
             "DATALOADER": {"NUM_INSTANCE": 4, "NUM_WORKERS": 0}, "TEST": {"IMS_PER_BATCH": 32, "VIS_QUERIES": 2}}


def _write_recipe(path: Path, data_root: Path, base_lr: float = 1.0e-3) -> Path:
    import yaml

    body = {"_BASE_": str(RECIPE), "DATASETS": {"ROOT_DIR": str(data_root)}, **SMALL_RUN}
    body["SOLVER"] = {**SMALL_RUN["SOLVER"], "BASE_LR": base_lr}
    path.write_text(yaml.safe_dump(body))
    return path


def _finetune(out: Path, data: Path, tower: Path, recipe: Path) -> subprocess.CompletedProcess:
    args = ["DATASETS.ROOT_DIR", str(data), "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled",
            "SOLVER.MAX_EPOCHS", "1", "SOLVER.EVAL_PERIOD", "1", "SOLVER.IMS_PER_BATCH", "16",
            "DATALOADER.NUM_INSTANCE", "4", "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32",
            "TEST.VIS_QUERIES", "2", "MODEL.PRETRAIN_PATH", str(tower), "MODEL.PRETRAIN_RECIPE", str(recipe)]
    return subprocess.run([sys.executable, "train_net.py", "--config_file", str(TINY), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.slow
def test_pretrained_tower_made_on_first_use_then_reused(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path / "recipe.yml", tmp_path / "pretrain_data")
    tower = tmp_path / "towers" / "tiny" / "tower.pt"
    first = _finetune(tmp_path / "ft1", tiny_rgbnt_root, tower, recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining it with" in first.stdout + first.stderr
    assert (tower.parent / "open_clip_config.json").is_file() and (tower.parent / "pretrain.json").is_file()

    # the file holds the pretraining run's final tower, under CLIP's key names
    saved = torch.load(tower, weights_only=True)
    run = tower.parent / "run"
    final = torch.load(run / (run / "last_checkpoint").read_text().strip(), weights_only=True)["model"]
    expected = {k.replace("backbone.visual.", "visual.", 1): v for k, v in final.items()
                if k.startswith("backbone.visual.")}
    assert set(saved) == set(expected) and len(saved) > 10
    assert all(torch.equal(saved[k], expected[k]) for k in saved)

    # a model built from the fine-tuning config starts from exactly those tensors
    cfg = load_config(str(TINY), ["MODEL.PRETRAIN_PATH", str(tower), "MODEL.PRETRAIN_RECIPE", str(recipe)])
    model = build_reid_model(cfg, num_classes=8, num_cameras=2)
    visual = model.backbone.visual.state_dict()
    assert all(torch.equal(visual[k[len("visual."):]], v) for k, v in saved.items())

    # a second run reuses it; a changed recipe is refused with one line, before any training
    mtime = tower.stat().st_mtime_ns
    second = _finetune(tmp_path / "ft2", tiny_rgbnt_root, tower, recipe)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pretraining it with" not in second.stdout + second.stderr and tower.stat().st_mtime_ns == mtime
    changed = _write_recipe(tmp_path / "recipe.yml", tmp_path / "pretrain_data", base_lr=5.0e-4)
    third = _finetune(tmp_path / "ft3", tiny_rgbnt_root, tower, changed)
    assert third.returncode == 2
    assert "another recipe" in third.stderr and "SOLVER.BASE_LR: 0.001 -> 0.0005" in third.stderr
    assert "Traceback" not in third.stderr
