"""engine/experiments/specs.py: the ablation table and sweep files, and the errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.experiments.specs import AblationError, SweepError, load_sweep, load_table


def test_shipped_table_loads_with_its_name() -> None:
    spec = load_table("sap_scale")
    assert spec["_name"] == "sap_scale" and spec["rows"] and spec["columns"]


def test_unknown_table_is_a_clear_error() -> None:
    with pytest.raises(AblationError, match="known tables: .*gate_init"):
        load_table("no_such_table")


def test_a_reference_that_is_no_row_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "t.yaml"
    table.write_text("script: train_net.py\ncolumns: [mAP]\nreference: nope\nrows:\n  - {label: a, config: x.yml}\n")
    with pytest.raises(AblationError, match="reference 'nope'"):
        load_table(str(table))


@pytest.mark.parametrize("spec, message", [
    ({"columns": ["mAP"], "rows": []}, "missing 'script'"),
    ({"script": "x.py", "columns": ["mAP"], "rows": [{"label": "a"}]}, "row 0 needs 'label' and 'config'"),
])
def test_a_table_without_what_it_needs_is_refused(spec: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(AblationError, match=message):
        load_table(str(path))


@pytest.mark.parametrize("spec, message", [
    ({"method": "bayes", "program": "x.py", "parameters": {}}, "method 'bayes' is not supported offline"),
    ({"method": "grid", "parameters": {}}, "missing 'program'"),
    ({"program": "x.py", "parameters": {}}, "missing 'method'"),
])
def test_a_sweep_that_cannot_run_offline_is_refused(spec: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError, match=message):
        load_sweep(path)
    with pytest.raises(SweepError, match="not found"):
        load_sweep(tmp_path / "absent.yaml")


def test_a_sweep_with_its_own_command_needs_no_program(tmp_path: Path) -> None:
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"x": {"value": 1}},
                                    "command": ["python", "train_net.py", "${args_no_hyphens}"]}))
    assert load_sweep(path)["_name"] == "own"
