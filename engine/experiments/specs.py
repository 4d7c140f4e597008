"""The two grid files: an ablation table (``configs/ablations/<name>.yaml``) and a W&B sweep file.

An ablation table names the training script, the columns (keys of each run's ``summary.json``) and the
rows (a config, flags and overrides each; ``tools/ablate.py`` documents the fields). A sweep file is a
standard W&B sweep configuration (``program``, ``method``, ``metric``, ``parameters``, ``command``).
Both loaders check the fields the runners need and add ``_name`` (the file's stem).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TABLE_DIR = REPO / "configs" / "ablations"
#: a sweep file's ``command`` when it has none (as W&B's)
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


class AblationError(ValueError):
    """The table file is unusable; the message names the field."""


class SweepError(ValueError):
    """The sweep file cannot be run; the message names the field."""


def load_table(name: str, table_dir: Path = TABLE_DIR) -> dict[str, Any]:
    """Read ``<table_dir>/<name>.yaml`` (or ``name`` itself, a ``.yaml``/``.yml`` path) and check its fields."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else table_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in table_dir.glob("*.yaml")))
        raise AblationError(f"no ablation table '{name}' ({path}); known tables: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("script", "columns", "rows"):
        if key not in spec:
            raise AblationError(f"{path}: missing '{key}'")
    for i, row in enumerate(spec["rows"]):
        if "label" not in row or "config" not in row:
            raise AblationError(f"{path}: row {i} needs 'label' and 'config'")
    if "reference" in spec and spec["reference"] not in [r["label"] for r in spec["rows"]]:
        raise AblationError(f"{path}: reference '{spec['reference']}' is not the label of a row")
    spec["_name"] = path.stem
    return spec


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep file and check that it can run offline (method ``grid`` or ``random``)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("method", "parameters"):
        if key not in spec:
            raise SweepError(f"{path}: missing '{key}'")
    if spec["method"] not in ("grid", "random"):
        raise SweepError(f"{path}: method '{spec['method']}' is not supported offline (grid, random)")
    if "program" not in spec and "${program}" in spec.get("command", DEFAULT_COMMAND):
        raise SweepError(f"{path}: missing 'program'")
    spec["_name"] = path.stem
    return spec
