"""engine/experiments/collect.py: values read back from finished runs, by seed; finished runs found and copied."""

from __future__ import annotations

import json
from pathlib import Path

from engine.experiments.collect import collect_row, finished_runs, read_metric, read_summary, reuse_run


def _finish(run_dir: Path, **values: float) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(values))
    return run_dir


def test_row_values_by_seed_and_what_went_wrong(tmp_path: Path) -> None:
    dirs = {s: tmp_path / f"seed{s}" for s in range(4)}
    _finish(dirs[0], mAP=0.5, rank1=0.6)
    _finish(dirs[1], mAP=0.7)  # no rank1: not an error for the default feature
    row = collect_row("a", ["mAP", "rank1"], dirs, failed={2: "error: boom"})
    assert row["values"] == {"mAP": {0: 0.5, 1: 0.7}, "rank1": {0: 0.6}}
    assert row["errors"] == ["seed 2: error: boom", "seed 3: finished without summary.json"]
    collected = collect_row("a", ["mAP"], dirs, failed={}, expect_finished=False)  # runs finished elsewhere
    assert collected["values"] == {"mAP": {0: 0.5, 1: 0.7}} and collected["errors"] == []


def test_a_feature_reads_its_own_keys(tmp_path: Path) -> None:
    dirs = {0: _finish(tmp_path / "s0", **{"mAP": 0.5, "moe/mAP": 0.4}), 1: _finish(tmp_path / "s1", mAP=0.6)}
    row = collect_row("moe", ["mAP"], dirs, failed={}, feature="moe")
    assert row["values"] == {"mAP": {0: 0.4}}
    assert row["errors"] == [f"seed 1: no 'moe/mAP' in {tmp_path / 's1' / 'summary.json'}"]


def test_metric_with_a_prefix_and_unfinished_runs(tmp_path: Path) -> None:
    run = _finish(tmp_path / "r", mAP=0.25)
    assert read_metric(run, "test/mAP") == 0.25 and read_metric(run, "mAP") == 0.25
    assert read_metric(run, "rank1") is None and read_metric(tmp_path / "none", "mAP") is None
    assert read_summary(tmp_path / "none") is None


def test_finished_runs_by_what_they_trained_and_a_copy_of_one(tmp_path: Path) -> None:
    first = _finish(tmp_path / "a" / "row" / "seed0", mAP=0.5)
    (first / "config.yaml").write_text("SEED: 0\n")
    (first / "checkpoint_epoch0001.pth").write_bytes(b"weights")
    second = _finish(tmp_path / "b" / "row" / "seed0", mAP=0.6)
    (second / "config.yaml").write_text("SEED: 0\n")  # the same config: the first folder wins
    (tmp_path / "c" / "row" / "seed0").mkdir(parents=True)  # unfinished: not listed
    found = finished_runs(tmp_path, lambda run_dir: (run_dir / "config.yaml").read_text())
    assert found == {"SEED: 0\n": first}
    copy = tmp_path / "d" / "row" / "seed0"
    reuse_run(first, copy)
    assert read_summary(copy) == {"mAP": 0.5} and (copy / "config.yaml").is_file()
    assert (copy / "REUSED_FROM").read_text().strip() == str(first) and not (copy / "checkpoint_epoch0001.pth").exists()
