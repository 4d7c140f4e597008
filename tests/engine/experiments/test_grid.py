"""engine/experiments/grid.py: a sweep's grid and random draws, run folder names, rows that share their runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.experiments.grid import (
    expand_sweep,
    flat_overrides,
    row_config,
    row_owners,
    run_folder,
    slug,
    sweep_run_name,
    table_folder,
)
from engine.experiments.specs import SweepError


def test_grid_is_the_cartesian_product_in_file_order() -> None:
    spec = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"values": [True, False]}}}
    runs = expand_sweep(spec)
    assert runs == [{"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
                    {"a": 2, "b": "x", "c": True}, {"a": 2, "b": "x", "c": False}]
    assert expand_sweep(spec, max_runs=3) == runs[:3]
    with pytest.raises(SweepError, match="'d': grid search needs"):
        expand_sweep({"method": "grid", "parameters": {"d": {"min": 0, "max": 1}}})


def test_random_method_is_seeded_and_needs_max_runs() -> None:
    spec = {"method": "random", "program": "x.py",
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
                           "k": {"values": [1, 2, 3]}, "n": {"distribution": "int_uniform", "min": 2, "max": 4},
                           "q": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25}}}
    a, b = expand_sweep(spec, 5, seed=3), expand_sweep(spec, 5, seed=3)
    assert a == b and len(a) == 5 and all(1e-5 <= r["lr"] <= 1e-3 and r["k"] in (1, 2, 3) for r in a)
    assert all(r["n"] in (2, 3, 4) and r["q"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in a)
    assert expand_sweep(spec, 5, seed=4) != a
    with pytest.raises(SweepError, match="max-runs"):
        expand_sweep(spec, None)


def test_run_folder_names() -> None:
    assert sweep_run_name(3, {"MODEL.SDTPS.GATE_INIT_SCALE": 0.5, "x y": "a/b"}) == "003-GATE_INIT_SCALE=0.5-x_y=a_b"
    assert slug("D + ATMoE (MoE feature)") == "D___ATMoE__MoE_feature"
    assert run_folder(Path("out/t"), "old init 1.0/0.0", 2) == Path("out/t/old_init_1.0_0.0/seed2")
    assert table_folder(Path("out"), "sdm", quick=True, real=False) == Path("out/sdm-quick")
    assert table_folder(Path("out"), "sdm", quick=False, real=True) == Path("out/sdm-real")
    assert table_folder(Path("out"), "sdm", quick=False, real=False) == Path("out/sdm")


def test_rows_config_by_mode_and_nested_overrides() -> None:
    row = {"label": "a", "config": "c.yml", "quick_config": "q.yml", "real_config": "r.yml"}
    assert [row_config(row, q, r) for q, r in ((False, False), (True, False), (False, True))] == ["c.yml", "q.yml", "r.yml"]
    assert row_config({"config": "c.yml"}, quick=True, real=False) == "c.yml"
    assert flat_overrides(["A", 1, ["B", ["C", 2.5]]]) == ["A", "1", "B", "C", "2.5"]


def test_rows_that_train_the_same_thing_share_the_first_one_s_runs() -> None:
    rows = [{"label": "a", "config": "x.yml"}, {"label": "b", "config": "x.yml", "overrides": ["K", 1]},
            {"label": "a, moe feature", "config": "x.yml", "feature": "moe"},
            {"label": "b again", "config": "x.yml", "overrides": [["K", "1"]]}]
    assert row_owners(rows, quick=False, real=False) == [0, 1, 0, 1]
