#!/usr/bin/env python
"""Run a W&B sweep file with no W&B server: one run after another (or ``--jobs N`` side by side over every
GPU), resumable, with a summary table.

    python tools/sweep.py configs/sweeps/gate_init.yaml [--max-runs N] [--dry-run] [--out outputs/sweeps]
        [--wandb-mode offline|disabled] [--seed 0] [--jobs N] [--gpus all|none|0,1] [-- KEY VALUE ...]

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
import shlex
import sys
from pathlib import Path
from typing import Any

from engine.experiments.collect import SUMMARY, read_metric
from engine.experiments.commands import interrupted, sweep_command, with_resume
from engine.experiments.grid import SweepRun, expand_sweep, sweep_run_name
from engine.experiments.jobs import Job, execute, parse_gpus, run_jobs
from engine.experiments.specs import SweepError, load_sweep
from engine.experiments.tables import write_sweep_summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--max-runs", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    parser.add_argument("--out", default="outputs/sweeps", help="parent folder of the sweep's run folders")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "disabled"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random method's draws")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side, each on its share of the CPUs and one GPU in turn (output in each "
                             "run's log.txt); 1: one after another, output on this terminal")
    parser.add_argument("--gpus", default="all", metavar="all|none|0,1",
                        help="with --jobs: the GPUs the runs take in turn (all visible, none, or device ids)")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE config overrides appended to every run")
    return parser


def plan(spec: dict[str, Any], params: list[dict[str, Any]], out_dir: Path, args: argparse.Namespace) -> list[SweepRun]:
    """The sweep's runs: each in ``<out>/<sweep>/<run name>``, with the runner's overrides and W&B settings."""
    runs = []
    for index, values in enumerate(params):
        name = sweep_run_name(index, values)
        run_dir = out_dir / name
        command = sweep_command(spec, values, [*args.overrides, "OUTPUT_DIR", str(run_dir),
                                               "WANDB.MODE", args.wandb_mode, "WANDB.GROUP", spec["_name"]])
        runs.append(SweepRun(name, values, command, run_dir))
    return runs


def run_sweep(spec: dict[str, Any], runs: list[SweepRun], out_dir: Path, wandb_mode: str, jobs: int = 1,
              gpus: list[str] | None = None) -> None:
    """Run every unfinished run (an interrupted one resumed): in turn with its output on this terminal, the
    summary rewritten after each; or ``jobs`` side by side over ``gpus`` (:func:`engine.experiments.jobs.run_jobs`)."""
    metric = spec.get("metric", {}).get("name", "")
    for r in runs:
        if (r.run_dir / SUMMARY).is_file():
            r.status, r.value = "done (kept)", read_metric(r.run_dir, metric)
    todo = [r for r in runs if not r.status]
    if jobs > 1:
        batch = [Job(r.name, r.name, with_resume(r.command) if interrupted(r.run_dir) else list(r.command))
                 for r in todo]
        errors = run_jobs(batch, jobs, env={"WANDB_MODE": wandb_mode, "TQDM_DISABLE": "1"}, gpus=gpus or [])
        for r in todo:
            r.status = "done" if r.name not in errors else f"failed ({errors[r.name]})"
            r.value = read_metric(r.run_dir, metric)
        return
    for r in todo:
        command = with_resume(r.command) if interrupted(r.run_dir) else list(r.command)
        print(f"\n=== {r.name}\n{shlex.join(command)}", flush=True)
        outcome = execute(command, env={"WANDB_MODE": wandb_mode}, capture=False)
        r.status = "done" if outcome.returncode == 0 else f"failed (exit {outcome.returncode})"
        r.value = read_metric(r.run_dir, metric)
        write_sweep_summary(out_dir, spec, [x for x in runs if x.status])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options may follow the file: FILE --dry-run -- KEY VALUE
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        parse_gpus(args.gpus)
    except ValueError as err:
        parser.error(str(err))
    try:
        spec = load_sweep(args.sweep_file)
        params = expand_sweep(spec, args.max_runs, args.seed)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) / spec["_name"]
    runs = plan(spec, params, out_dir, args)
    print(f"{len(runs)} runs of {args.sweep_file} ({spec['method']}) -> {out_dir}")
    for r in runs:
        print(f"  {r.name}: {shlex.join(r.command)}")
    if args.dry_run:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    run_sweep(spec, runs, out_dir, args.wandb_mode, args.jobs, parse_gpus(args.gpus))
    print("\n" + write_sweep_summary(out_dir, spec, [r for r in runs if r.status]))
    return 0 if all(r.status.startswith("done") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
