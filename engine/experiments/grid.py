"""Expanding a grid into runs and naming their folders.

An ablation table runs every row over seeds ``0 .. seeds-1`` in ``<out>/<table>[-quick|-real]/<row>/seed<k>``;
rows that train exactly the same thing (same config, flags and overrides, e.g. one model scored by two
features) share the first such row's runs. A sweep runs the Cartesian product of its parameters' values
(``grid``) or seeded random draws (``random``) in ``<out>/<sweep>/<index>-<name>=<value>...``.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.experiments.specs import SweepError


# ---- ablation tables -----------------------------------------------------------------------------------
def slug(label: str) -> str:
    """Folder name of a row label: characters other than letters, digits and ``._-`` become ``_``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label).strip("_")[:80]


def table_folder(out: Path, name: str, quick: bool, real: bool) -> Path:
    """Where a table's runs and files go: quick, synthetic and real runs of one table never share a folder."""
    return Path(out) / (name + ("-quick" if quick else "-real" if real else ""))


def run_folder(folder: Path, label: str, seed: int) -> Path:
    """The folder of one (row, seed) run of a table."""
    return folder / slug(label) / f"seed{seed}"


def flat_overrides(items: list[Any]) -> list[str]:
    """Overrides as strings; nested lists (YAML anchors shared by several rows) are spliced in."""
    out: list[str] = []
    for item in items:
        out += flat_overrides(item) if isinstance(item, list) else [str(item)]
    return out


def row_config(row: dict[str, Any], quick: bool, real: bool) -> str:
    """The config file a row trains with in this mode (``real``: its ``real_config``, which it must have)."""
    if real:
        return row["real_config"]
    return row.get("quick_config", row["config"]) if quick else row["config"]


def run_identity(row: dict[str, Any], quick: bool, real: bool) -> tuple[str, ...]:
    """What a row trains: its config, arguments and overrides (rows with equal identities share runs)."""
    return (row_config(row, quick, real), *map(str, row.get("args", [])), "|",
            *flat_overrides(row.get("overrides", [])))


def row_owners(rows: list[dict[str, Any]], quick: bool, real: bool) -> list[int]:
    """For each row, the index of the first row that trains what it trains (its own index, mostly)."""
    first: dict[tuple[str, ...], int] = {}
    return [first.setdefault(run_identity(row, quick, real), i) for i, row in enumerate(rows)]


# ---- sweeps ----------------------------------------------------------------------------------------------
@dataclass
class SweepRun:
    """One run of a sweep: folder name, parameters, command and folder; ``status`` and ``value`` (the sweep
    metric) once it was tried or found finished."""

    name: str
    params: dict[str, Any]
    command: list[str]
    run_dir: Path
    status: str = ""
    value: float | None = None


def _grid_values(name: str, param: dict[str, Any]) -> list[Any]:
    if "values" in param:
        return list(param["values"])
    if "value" in param:
        return [param["value"]]
    raise SweepError(f"parameter '{name}': grid search needs 'values' or 'value'")


def _draw(name: str, param: dict[str, Any], rng: random.Random) -> Any:
    """One value of a parameter: ``values``, ``value`` or a W&B ``distribution`` between ``min`` and ``max``."""
    if "values" in param:
        return rng.choice(list(param["values"]))
    if "value" in param:
        return param["value"]
    dist = param.get("distribution", "uniform")
    lo, hi = param.get("min"), param.get("max")
    if lo is None or hi is None:
        raise SweepError(f"parameter '{name}': distribution '{dist}' needs min and max")
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "q_uniform":
        q = param.get("q", 1.0)
        return round(rng.uniform(lo, hi) / q) * q
    raise SweepError(f"parameter '{name}': distribution '{dist}' is not supported offline")


def expand_sweep(spec: dict[str, Any], max_runs: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs' parameter dicts: the full grid in file order (cut to ``max_runs``), or ``max_runs`` random
    draws seeded by ``seed``."""
    params: dict[str, dict[str, Any]] = spec["parameters"]
    if spec["method"] == "grid":
        names = list(params)
        grid = [dict(zip(names, combo)) for combo in itertools.product(*(_grid_values(n, params[n]) for n in names))]
        return grid[:max_runs] if max_runs else grid
    if not max_runs:
        raise SweepError("method 'random' needs --max-runs")
    rng = random.Random(seed)
    return [{n: _draw(n, p, rng) for n, p in params.items()} for _ in range(max_runs)]


def sweep_run_name(index: int, params: dict[str, Any]) -> str:
    """A stable, readable folder name: ``003-init_scale=0.5-init_bias=0.7``."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in params.items()]
    name = "-".join([f"{index:03d}", *parts])
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)[:180]
