#!/usr/bin/env python
"""Run a W&B sweep file with no W&B server: one run after another, resumable, with a summary table.

    python tools/sweep.py configs/sweeps/gate_init.yaml [--max-runs N] [--dry-run] [--out outputs/sweeps]
        [--wandb-mode offline|disabled] [--seed 0] [-- KEY VALUE ...]

The file is a standard W&B sweep configuration (``program``, ``method``, ``metric``,
``parameters``, ``command``), so the same file also works with ``wandb sweep`` +
``wandb agent`` for a logged-in user. wandb 0.31 ships no local sweep controller
(``wandb.controller(..., local=True)`` needs a server too), hence this runner.

Supported: ``method`` grid (Cartesian product of every ``values`` list, in file order)
and random (``--max-runs`` draws, seeded; ``values``, ``value``, ``distribution``
uniform / int_uniform / log_uniform_values / q_uniform); ``command`` macros ``${env}``,
``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}``,
``${args_no_boolean_flags}``. Each run gets ``OUTPUT_DIR <out>/<sweep>/<run name>`` and
``WANDB.MODE`` appended as overrides; a run whose folder holds ``summary.json`` is
finished and is not run again, so an interrupted sweep continues where it stopped.
The summary (Markdown + CSV) lists every run's parameters and the sweep metric.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
FINISHED = "summary.json"
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


class SweepError(ValueError):
    """The sweep file cannot be run; the message names the field."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file."""
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


def _grid_values(name: str, param: dict[str, Any]) -> list[Any]:
    if "values" in param:
        return list(param["values"])
    if "value" in param:
        return [param["value"]]
    raise SweepError(f"parameter '{name}': grid search needs 'values' or 'value'")


def _draw(name: str, param: dict[str, Any], rng: random.Random) -> Any:
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


def expand(spec: dict[str, Any], max_runs: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs' parameter dicts: the full grid (cut to ``max_runs``) or ``max_runs`` random draws."""
    params: dict[str, dict[str, Any]] = spec["parameters"]
    if spec["method"] == "grid":
        names = list(params)
        grid = [dict(zip(names, combo)) for combo in itertools.product(*(_grid_values(n, params[n]) for n in names))]
        return grid[:max_runs] if max_runs else grid
    if not max_runs:
        raise SweepError("method 'random' needs --max-runs")
    rng = random.Random(seed)
    return [{n: _draw(n, p, rng) for n, p in params.items()} for _ in range(max_runs)]


def _fmt(value: Any) -> str:
    return str(value)


def run_name(index: int, params: dict[str, Any]) -> str:
    """A stable, readable folder name: ``003-init_scale=0.5-init_bias=0.7``."""
    parts = [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items()]
    name = "-".join([f"{index:03d}", *parts])
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)[:180]


def build_command(spec: dict[str, Any], params: dict[str, Any], extra: list[str]) -> list[str]:
    """Expand the sweep's ``command`` for one run, then append the runner's overrides."""
    out: list[str] = []
    for token in spec.get("command", DEFAULT_COMMAND):
        if token == "${env}":
            continue
        if token == "${interpreter}":
            out.append(sys.executable)
        elif token == "${program}":
            out.append(spec["program"])
        elif token == "${args}":
            out += [f"--{k}={_fmt(v)}" for k, v in params.items()]
        elif token == "${args_no_hyphens}":
            out += [f"{k}={_fmt(v)}" for k, v in params.items()]
        elif token == "${args_no_boolean_flags}":
            out += [f"--{k}" if v is True else f"--{k}={_fmt(v)}" for k, v in params.items() if v is not False]
        elif token in ("python", "python3"):
            out.append(sys.executable)
        else:
            out.append(token)
    return out + extra


def read_metric(run_dir: Path, metric: str) -> float | None:
    """The sweep metric from a finished run's ``summary.json`` (``test/mAP`` also matches ``mAP``)."""
    path = run_dir / FINISHED
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    for key in (metric, metric.split("/", 1)[-1]):
        if key in summary:
            return float(summary[key])
    return None


def write_summary(out_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """Markdown + CSV table of every run (parameters, status, metric); returns the Markdown."""
    metric = spec.get("metric", {}).get("name", "")
    names = list(spec["parameters"])
    header = ["run", *names, "status", metric or "metric"]
    rows = [[r["name"], *[_fmt(r["params"][n]) for n in names], r["status"],
             "" if r["value"] is None else f"{r['value']:.4f}"] for r in runs]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out_dir / "summary.csv", buf.getvalue())
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    done = [r for r in runs if r["value"] is not None]
    if done and metric:
        goal = spec.get("metric", {}).get("goal", "maximize")
        best = (max if goal == "maximize" else min)(done, key=lambda r: r["value"])
        md += f"\nbest ({goal} {metric}): {best['name']} = {best['value']:.4f}\n"
    atomic_write_text(out_dir / "summary.md", md)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--max-runs", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    parser.add_argument("--out", default="outputs/sweeps", help="parent folder of the sweep's run folders")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "disabled"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random method's draws")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE config overrides appended to every run")
    args = parser.parse_intermixed_args(argv)  # options may follow the file: FILE --dry-run -- KEY VALUE
    try:
        spec = load_sweep(args.sweep_file)
        runs_params = expand(spec, args.max_runs, args.seed)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) / spec["_name"]
    runs: list[dict[str, Any]] = []
    metric = spec.get("metric", {}).get("name", "")
    for index, params in enumerate(runs_params):
        name = run_name(index, params)
        run_dir = out_dir / name
        command = build_command(spec, params, [*args.overrides, "OUTPUT_DIR", str(run_dir),
                                               "WANDB.MODE", args.wandb_mode, "WANDB.GROUP", spec["_name"]])
        runs.append({"name": name, "params": params, "command": command, "dir": run_dir})
    print(f"{len(runs)} runs of {args.sweep_file} ({spec['method']}) -> {out_dir}")
    for r in runs:
        print(f"  {r['name']}: {shlex.join(r['command'])}")
    if args.dry_run:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in runs:
        value = read_metric(r["dir"], metric)
        if (r["dir"] / FINISHED).is_file():
            r.update(status="done (kept)", value=value)
            continue
        command = list(r["command"])
        if (r["dir"] / "last_checkpoint").is_file():  # interrupted mid-run: continue it
            command.insert(_program_index(command) + 1, "--resume")  # before the trailing KEY VALUE pairs
        print(f"\n=== {r['name']}\n{shlex.join(command)}", flush=True)
        proc = subprocess.run(command, cwd=REPO, env={**os.environ, "WANDB_MODE": args.wandb_mode})
        value = read_metric(r["dir"], metric)
        r.update(status="done" if proc.returncode == 0 else f"failed (exit {proc.returncode})", value=value)
        write_summary(out_dir, spec, runs_so_far(runs))
    print("\n" + write_summary(out_dir, spec, runs_so_far(runs)))
    return 0 if all(r.get("status", "").startswith("done") for r in runs) else 1


def _program_index(command: list[str]) -> int:
    """Position of the training script in ``command`` (flags must follow it, before the overrides)."""
    return next(i for i, tok in enumerate(command) if tok.endswith(".py"))


def runs_so_far(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with a status (finished or attempted), for the running summary."""
    return [r for r in runs if "status" in r]


if __name__ == "__main__":
    sys.exit(main())
