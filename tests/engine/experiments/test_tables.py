"""engine/experiments/tables.py: the ablation table (mean ± std, paired Δ with its interval) and the sweep summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.experiments.grid import SweepRun
from engine.experiments.tables import delta_cell, plot_table, render_table, write_sweep_summary


def _row(label: str, values: dict[int, float], errors: list[str] | None = None) -> dict:
    return {"label": label, "values": {"mAP": values}, "errors": errors or []}


def test_render_mean_and_std_in_percent() -> None:
    spec = {"columns": ["mAP"], "_name": "t"}
    md, csv_text = render_table(spec, [_row("a", {0: 0.1, 1: 0.2, 2: 0.3})], 3)
    assert "| a | 20.00 ± 10.00 | 3/3 |" in md
    assert csv_text.splitlines()[0] == "row,mAP_mean,mAP_std,seeds_ok,status"


def test_paired_differences_to_the_reference_row() -> None:
    ref = {0: 0.50, 1: 0.60, 2: 0.55}
    near = {0: 0.53, 1: 0.62, 2: 0.60, 3: 0.99}
    far = {0: 0.60, 1: 0.71, 2: 0.65}
    spec = {"columns": ["mAP"], "_name": "t", "reference": "ref"}
    rows = [_row(n, v) for n, v in (("ref", ref), ("near", near), ("far", far))]
    md, csv_text = render_table(spec, rows, 3)
    assert "| ref | 55.00 ± 5.00 | reference | 3/3 |" in md
    assert "| near | " in md and "+3.33 ± 3.79 |" in md  # the interval holds 0: no mark
    assert "+10.33 ± 1.43 * |" in md
    assert "Δ: paired difference to 'ref'" in md
    header, *lines = csv_text.splitlines()
    assert header.split(",")[3:5] == ["delta_mAP_mean", "delta_mAP_ci95"]
    far_row = next(line.split(",") for line in lines if line.startswith("far"))
    assert float(far_row[3]) == pytest.approx(0.31 / 3) and float(far_row[4]) == pytest.approx(0.014342, abs=1e-6)
    ref_row = next(line.split(",") for line in lines if line.startswith("ref"))
    assert ref_row[3:5] == ["", ""]


def test_delta_cells_and_failed_rows() -> None:
    assert delta_cell(float("nan"), float("nan")) == "–"
    assert delta_cell(0.03, float("nan")) == "+3.00 (1 seed)"
    assert delta_cell(-0.02, 0.01) == "-2.00 ± 1.00 *"
    md, csv_text = render_table({"columns": ["mAP"], "_name": "t"}, [_row("x", {}, ["seed 0: error: boom"])], 2)
    assert "| x | – | 0/2 (failed: seed 0: error: boom) |" in md and csv_text.strip().endswith("seed 0: error: boom")


def test_plot_is_written(tmp_path: Path) -> None:
    plot_table({"columns": ["mAP"], "_name": "t"}, [_row("a", {0: 0.5}), _row("b", {})], tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_summary_lists_every_run_and_the_best(tmp_path: Path) -> None:
    spec = {"parameters": {"x": {}}, "metric": {"name": "test/mAP", "goal": "minimize"}}
    runs = [SweepRun("000-x=1", {"x": 1}, [], tmp_path, "done", 0.3),
            SweepRun("001-x=2", {"x": 2}, [], tmp_path, "failed (exit 3)", None),
            SweepRun("002-x=3", {"x": 3}, [], tmp_path, "done (kept)", 0.1)]
    md = write_sweep_summary(tmp_path, spec, runs)
    assert md.splitlines()[0] == "| run | x | status | test/mAP |"
    assert "| 001-x=2 | 2 | failed (exit 3) |  |" in md and "best (minimize test/mAP): 002-x=3 = 0.1000" in md
    assert (tmp_path / "summary.md").read_text() == md
    assert (tmp_path / "summary.csv").read_text().splitlines()[1] == "000-x=1,1,done,0.3000"
