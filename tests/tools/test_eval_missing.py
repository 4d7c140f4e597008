"""tools/eval_missing.py: DeMo's missing-modality table from one command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.checkpoint import Checkpointer
from engine.config import load_config
from engine.reid import build_reid_model
from tools.eval_missing import missing_table

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml"


def test_table_layout_and_average_by_hand() -> None:
    rows = {"r": {"mAP": 0.50, "rank1": 0.60}, "n": {"mAP": 0.40, "rank1": 0.30}, "t": {"mAP": 0.30, "rank1": 0.30},
            "rn": {"mAP": 0.20, "rank1": 0.10}, "rt": {"mAP": 0.10, "rank1": 0.20}, "nt": {"mAP": 0.30, "rank1": 0.30}}
    md, csv = missing_table(rows)
    header, _, maps, r1s = md.strip().splitlines()
    assert header == ("| | M (RGB) | M (NIR) | M (TIR) | M (RGB+NIR) | M (RGB+TIR) | M (NIR+TIR) | Average |")
    assert maps == "| mAP | 50.0 | 40.0 | 30.0 | 20.0 | 10.0 | 30.0 | 30.0 |"  # (50+40+30+20+10+30)/6 = 30
    assert r1s == "| R-1 | 60.0 | 30.0 | 30.0 | 10.0 | 20.0 | 30.0 | 30.0 |"
    assert csv.splitlines()[-1] == "Average,30.0000,30.0000"


def test_six_settings_from_one_checkpoint(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = ["DATASETS.ROOT_DIR", str(tiny_rgbnt_root), "OUTPUT_DIR", str(out), "WANDB.MODE", "disabled",
                 "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32"]
    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    weights = Checkpointer(tmp_path / "trained").save("epoch0001", model=build_reid_model(cfg, 8, 2), epoch=1)
    proc = subprocess.run(
        [sys.executable, "tools/eval_missing.py", "--config_file", str(TINY), *overrides, "MODEL.WEIGHTS", str(weights),
         "TEST.MISS_MODE", "zero"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "missing_table.json").read_text())
    assert set(record["settings"]) == {"r", "n", "t", "rn", "rt", "nt"} and record["miss_mode"] == "zero"
    assert record["settings"]["rt"]["missing_modalities"] == ["RGB", "TI"]
    for row in record["settings"].values():
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["rank1"] <= 1.0
    assert "M (NIR+TIR)" in (out / "missing_table.md").read_text() and "M (NIR+TIR)" in proc.stdout
    assert "evaluating with NI + TI missing" in proc.stdout + proc.stderr
    # a second table into the same folder is refused and leaves the first as it was; --force replaces it
    before = {p.name: p.read_bytes() for p in out.glob("missing_table.*")}
    cmd = [sys.executable, "tools/eval_missing.py", "--config_file", str(TINY), *overrides, "MODEL.WEIGHTS",
           str(weights), "TEST.MISS_MODE", "zero"]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds missing_table.md, missing_table.csv, missing_table.json; nothing was written" in again.stderr
    assert {p.name: p.read_bytes() for p in out.glob("missing_table.*")} == before
    forced = subprocess.run([*cmd[:4], "--force", *cmd[4:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-3000:]
