"""tools/ablate.py: quick gate_init and sap_scale rows end to end, failed rows, shared and reused runs, --collect,
and what the command refuses. The runner's parts are tested in tests/engine/experiments/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.fewshot_data import tiny_fewshot_set
from tools import ablate

REPO = Path(__file__).resolve().parents[2]

TINY_REID = ["SOLVER.MAX_EPOCHS", "1", "SOLVER.EVAL_PERIOD", "1", "SOLVER.IMS_PER_BATCH", "16",
             "DATALOADER.NUM_INSTANCE", "4", "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32",
             "TEST.VIS_QUERIES", "1"]


def _ablate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/ablate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_quick_gate_init_rows_give_a_table(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    res = _ablate("--table", "gate_init", "--quick", "--seeds", "2", "--jobs", "2", "--out", str(tmp_path),
                  "--rows", "old init 1.0/0.0", "new init 0.5/0.5", "--",
                  "DATASETS.ROOT_DIR", str(tiny_rgbnt_root), *TINY_REID)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "gate_init-quick" / "gate_init.md").read_text()
    assert "| old init 1.0/0.0 |" in table and "| new init 0.5/0.5 |" in table and "2/2" in table
    rows = (tmp_path / "gate_init-quick" / "gate_init.csv").read_text().splitlines()
    assert rows[0].startswith("row,mAP_mean") and len(rows) == 3
    assert (tmp_path / "gate_init-quick" / "gate_init.png").stat().st_size > 0
    # the runs used the flags of their row
    cfg = yaml.safe_load((tmp_path / "gate_init-quick" / "old_init_1.0_0.0" / "seed1" / "config.yaml").read_text())
    assert cfg["MODEL"]["SDTPS"]["GATE_INIT_SCALE"] == 1.0 and cfg["SEED"] == 1
    # repeating the command reuses the finished runs (no training: fast, same table)
    again = _ablate("--table", "gate_init", "--quick", "--seeds", "2", "--out", str(tmp_path),
                    "--rows", "old init 1.0/0.0", "new init 0.5/0.5", "--",
                    "DATASETS.ROOT_DIR", str(tiny_rgbnt_root), *TINY_REID)
    assert again.returncode == 0 and "===" not in again.stdout
    assert (tmp_path / "gate_init-quick" / "gate_init.md").read_text() == table


@pytest.mark.slow
def test_quick_sap_scale_rows(tmp_path: Path) -> None:
    res = _ablate("--table", "sap_scale", "--quick", "--seeds", "1", "--out", str(tmp_path / "out"),
                  "--rows", "learnable (no-decay group)", "learnable, decayed", "--",
                  "DATASETS.ROOT_DIR", str(tmp_path / "data"), "SOLVER.MAX_EPOCHS", "1",
                  "FEWSHOT.PRETRAIN.EPOCHS", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "out" / "sap_scale-quick" / "sap_scale.md").read_text()
    assert "| learnable, decayed |" in table and "1/1" in table


@pytest.mark.slow
def test_a_failing_row_is_marked_and_the_others_still_run(tiny_rgbnt_root: Path, tmp_path: Path) -> None:
    spec = {"script": "train_net.py", "columns": ["mAP"], "rows": [
        {"label": "broken", "config": "configs/synthetic/DeMo_SDTPS_tiny.yml", "overrides": ["MODEL.NAME", "Nope"]},
        {"label": "fine", "config": "configs/synthetic/DeMo_SDTPS_tiny.yml"},
    ]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = _ablate("--table", str(path), "--seeds", "1", "--out", str(tmp_path / "out"), "--",
                  "DATASETS.ROOT_DIR", str(tiny_rgbnt_root), *TINY_REID)
    assert res.returncode == 1
    table = (tmp_path / "out" / "toy" / "toy.md").read_text()
    assert "failed: seed 0: error: not implemented yet: model 'Nope'" in table
    assert "| fine |" in table and "| fine | – |" not in table  # the good row ran and has a value


def test_quick_and_full_tables_use_separate_folders(tmp_path: Path) -> None:
    quick = _ablate("--table", "sdm", "--quick", "--seeds", "1", "--dry-run", "--out", str(tmp_path)).stdout
    full = _ablate("--table", "sdm", "--seeds", "1", "--dry-run", "--out", str(tmp_path)).stdout
    assert str(tmp_path / "sdm-quick" / "no_SDM" / "seed0") in quick
    assert str(tmp_path / "sdm" / "no_SDM" / "seed0") in full
    # the quick runs read the small missing-modality set, the full runs the ablation-preset one
    assert quick.splitlines()[0].split("DATASETS.ROOT_DIR")[-1].split()[0] == "data/missing30"
    assert "configs/synthetic/DeMo_SDTPS_pretrained.yml" in full and "data/ablation_missing30" in full


@pytest.mark.parametrize("args, message", [
    (["--rows", "no sap"], "--rows 'no sap' is not a row of table sap_scale"),
    (["--seeds", "0"], "--seeds 0 selects no run"),
])
def test_a_selection_of_no_run_is_refused_and_the_finished_table_kept(args: list[str], message: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "sap_scale"
    table.mkdir()
    for name in ("sap_scale.md", "sap_scale.csv", "sap_scale.png"):
        (table / name).write_text(f"the finished table's {name}")
    before = {p.name: p.read_bytes() for p in table.iterdir()}
    assert ablate.main(["--table", "sap_scale", "--collect", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was run or written" in err and "'no SAP'" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in table.iterdir()} == before


def test_collecting_no_finished_run_keeps_the_finished_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "sap_scale"
    table.mkdir()
    (table / "sap_scale.md").write_text("the finished table")
    assert ablate.main(["--table", "sap_scale", "--collect", "--out", str(tmp_path)]) == 2
    assert "no finished run of table sap_scale" in capsys.readouterr().err
    assert (table / "sap_scale.md").read_text() == "the finished table" and not (table / "sap_scale.csv").exists()


@pytest.mark.slow
def test_rows_that_train_the_same_model_share_runs_and_score_their_feature(tiny_rgbnt_root: Path,
                                                                           tmp_path: Path) -> None:
    res = _ablate("--table", "demo_paper", "--quick", "--seeds", "1", "--out", str(tmp_path),
                  "--rows", "D + ATMoE (MoE feature)", "E full DeMo", "--",
                  "DATASETS.ROOT_DIR", str(tiny_rgbnt_root), *TINY_REID)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("=== row") == 1 and "reads the runs of row 0" in res.stdout
    summary = yaml.safe_load((tmp_path / "demo_paper-quick" / "D___ATMoE__MoE_feature" / "seed0" /
                              "summary.json").read_text())
    rows = {line.split(",")[0]: line.split(",") for line in
            (tmp_path / "demo_paper-quick" / "demo_paper.csv").read_text().splitlines()[1:]}
    assert float(rows["D + ATMoE (MoE feature)"][1]) == pytest.approx(summary["moe/mAP"])
    assert float(rows["E full DeMo"][1]) == pytest.approx(summary["mAP"])
    config = yaml.safe_load((tmp_path / "demo_paper-quick" / "D___ATMoE__MoE_feature" / "seed0" /
                             "config.yaml").read_text())
    assert config["MODEL"]["NAME"] == "DeMo" and config["LOSS"]["SDM"]["ENABLED"] is False


def test_collect_renders_finished_runs_and_trains_nothing(tmp_path: Path) -> None:
    """Runs copied back from another machine: two seeds of one row, one of the other, nothing trained."""
    import json

    out = tmp_path / "out" / "sdm"
    values = {("no_SDM", 0): 0.50, ("no_SDM", 1): 0.52, ("fixed___masks", 0): 0.53}
    for (row, seed), m in values.items():
        run = out / row / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"mAP": m, "rank1": m, "mINP": m, "modality_concat/mAP": m}))
    res = _ablate("--table", "sdm", "--seeds", "2", "--collect", "--out", str(tmp_path / "out"),
                  "--rows", "no SDM", "fixed + masks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "===" not in res.stdout  # nothing trained
    table = (out / "sdm.md").read_text()
    assert "| no SDM | 51.00 ± 1.41 |" in table and "2/2 |" in table
    assert "| fixed + masks | 53.00 ± 0.00 |" in table and "+3.00 (1 seed)" in table and "1/2 |" in table
    # the same runs against another reference row
    res = _ablate("--table", "sdm", "--seeds", "2", "--collect", "--out", str(tmp_path / "out"),
                  "--rows", "no SDM", "fixed + masks", "--reference", "fixed + masks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| no SDM | 51.00 ± 1.41 | 51.00 ± 1.41 | 51.00 ± 1.41 | 51.00 ± 1.41 | -3.00 (1 seed) |" in res.stdout
    bad = _ablate("--table", "sdm", "--collect", "--out", str(tmp_path / "out"), "--reference", "nope")
    assert bad.returncode == 2 and "--reference 'nope' is not one of the rows" in bad.stderr


def test_a_run_another_table_already_trained_is_reused_not_trained(tmp_path: Path) -> None:
    """gate_init's 'new init 0.5/0.5' trains exactly the config of sdtps's '+ SDTPS' (the flags and the override
    set the defaults): a finished '+ SDTPS' run is copied instead of trained again."""
    import json

    from engine.config import load_config

    source = tmp_path / "out" / "sdtps" / "SDTPS" / "seed0"
    source.mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_pretrained.yml",
                      ["MODEL.DGAF.ENABLED", "False", "SEED", "0", "OUTPUT_DIR", str(source), "WANDB.NAME", "x"])
    (source / "config.yaml").write_text(cfg.dump())
    (source / "summary.json").write_text(json.dumps({"mAP": 0.76, "rank1": 0.85, "mINP": 0.5}))
    (source / "checkpoint_epoch0030.pth").write_bytes(b"weights")
    args = ["--table", "gate_init", "--seeds", "1", "--collect", "--out", str(tmp_path / "out")]
    kept = _ablate(*args, "--rows", "new init 0.5/0.5", "--no-reuse")  # --no-reuse: nothing copied
    assert kept.returncode == 0 and "reuses" not in kept.stdout and "0/1 |" in kept.stdout
    res = _ablate(*args, "--rows", "new init 0.5/0.5", "old init 1.0/0.0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "row 1 (new init 0.5/0.5) seed 0: reuses" in res.stdout and "row 0" not in res.stdout
    copy = tmp_path / "out" / "gate_init" / "new_init_0.5_0.5" / "seed0"
    assert (copy / "REUSED_FROM").read_text().strip() == str(source)
    assert not (copy / "checkpoint_epoch0030.pth").exists()  # checkpoints stay with the source
    assert "| new init 0.5/0.5 | 76.00 ± 0.00 |" in res.stdout and "| old init 1.0/0.0 | – |" in res.stdout
    # another seed is another config: not reused
    seed1 = _ablate("--table", "gate_init", "--seeds", "2", "--collect", "--out", str(tmp_path / "out"),
                    "--rows", "new init 0.5/0.5")
    assert "seed 1: reuses" not in seed1.stdout and "1/2 |" in seed1.stdout


@pytest.mark.slow
def test_a_shared_pretraining_is_made_once_per_seed_before_the_runs_and_within_the_time_limit(tmp_path: Path) -> None:
    tiny_fewshot_set(tmp_path / "data", 12)
    tiny = REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"_BASE_: {tiny}\nMODEL:\n  NUM_CLASSES: 12\n  SAP:\n    ENABLED: False\n"
                      "FEWSHOT:\n  STAGES: [pretrain]\n")
    bed = tmp_path / "bed.yml"
    bed.write_text(f"_BASE_: {tiny}\nMODEL:\n  NUM_CLASSES: 12\nFEWSHOT:\n  STAGES: [meta]\n  PRETRAIN:\n"
                   f"    RECIPE: {recipe}\n    CACHE_DIR: {tmp_path / 'pre'}\n")
    table = tmp_path / "table.yaml"
    table.write_text(yaml.safe_dump({"script": "train_b1_improvement.py", "columns": ["5way_1shot/acc"], "rows": [
        {"label": "no SAP", "config": str(bed), "overrides": ["MODEL.SAP.ENABLED", "False"]},
        {"label": "SAP", "config": str(bed)}]}))
    args = ["--table", str(table), "--seeds", "2", "--jobs", "2", "--out", str(tmp_path / "out"), "--",
            "DATASETS.ROOT_DIR", str(tmp_path / "data")]
    # the two seeds' pre-trainings take longer than the limit: they are made, and then no run starts
    first = _ablate(*args[:6], "--time-limit", "3", "--run-seconds", "2", *args[6:])
    assert "making 2 pretrained piece(s) first" in first.stdout, first.stderr[-3000:]
    assert first.stdout.count("not started (--time-limit") == 4 and "===" not in first.stdout
    made = {seed: (tmp_path / "pre" / f"seed{seed}" / "weights.pth").stat().st_mtime_ns for seed in (0, 1)}
    res = _ablate(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "making" not in res.stdout and "2/2" in (tmp_path / "out" / "table" / "table.md").read_text()
    assert {seed: (tmp_path / "pre" / f"seed{seed}" / "weights.pth").stat().st_mtime_ns for seed in (0, 1)} == made
    for row in ("no_SAP", "SAP"):
        for seed in (0, 1):
            log = (tmp_path / "out" / "table" / row / f"seed{seed}" / "log.txt").read_text()
            assert f"pre/seed{seed}/weights.pth (recipe" in log and "stage pretrain" not in log


@pytest.mark.parametrize("table", sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml")))
def test_every_shipped_table_loads_every_row_in_every_mode(table: str) -> None:
    """Each row's config (default, --quick and, where it has one, --real) loads with the row's and the table's
    overrides, and the row's flags are those of the table's script."""
    from engine.config import load_config
    from engine.experiments.grid import flat_overrides, row_config
    from engine.experiments.specs import load_table

    spec = load_table(table)
    for row in spec["rows"]:
        modes = [(False, False), (True, False)] + ([(False, True)] if "real_config" in row else [])
        for quick, real in modes:
            path = REPO / row_config(row, quick, real)
            assert path.is_file(), f"{table}: {row['label']}: no config {path}"
            opts = [*flat_overrides(row.get("overrides", [])), *(map(str, spec.get("quick", [])) if quick else [])]
            cfg = load_config(path, opts)
            assert ("FEWSHOT" in cfg) == (Path(spec["script"]).name == "train_b1_improvement.py"), row["label"]
