"""The command line of one run: the training script, its config and flags, then ``KEY VALUE`` overrides.

Every run's own folder, seed and W&B settings come last, so they win over anything before them. A run
that was interrupted (a ``last_checkpoint`` and no ``summary.json`` in its folder) gets ``--resume``,
placed after the script's flags and before the overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from engine.experiments.collect import SUMMARY
from engine.experiments.grid import flat_overrides, row_config, slug
from engine.experiments.specs import DEFAULT_COMMAND

#: written by a training run at every checkpoint: the run can be resumed
LAST_CHECKPOINT = "last_checkpoint"


def interrupted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that started and did not finish."""
    return (run_dir / LAST_CHECKPOINT).is_file() and not (run_dir / SUMMARY).is_file()


def table_command(spec: dict[str, Any], row: dict[str, Any], seed: int, run_dir: Path, quick: bool, real: bool,
                  wandb_mode: str, extra: list[str] = ()) -> list[str]:
    """The training command of one (row, seed) of an ablation table: the row's config and ``args``, its
    ``overrides``, the table's ``quick`` overrides (``quick``), ``extra``, then seed, folder and W&B names."""
    cmd = [sys.executable, spec["script"], "--config_file", row_config(row, quick, real),
           *map(str, row.get("args", []))]
    if interrupted(run_dir):
        cmd.append("--resume")  # before the KEY VALUE pairs
    cmd += flat_overrides(row.get("overrides", []))
    if quick:
        cmd += [str(x) for x in spec.get("quick", [])]
    cmd += list(extra)
    cmd += ["SEED", str(seed), "OUTPUT_DIR", str(run_dir), "WANDB.MODE", wandb_mode,
            "WANDB.GROUP", f"ablation-{spec['_name']}", "WANDB.NAME", f"{slug(row['label'])}-seed{seed}"]
    return cmd


def sweep_command(spec: dict[str, Any], params: dict[str, Any], extra: list[str]) -> list[str]:
    """A sweep file's ``command`` for one run (W&B's macros ``${env}``, ``${interpreter}``, ``${program}``,
    ``${args}``, ``${args_no_hyphens}``, ``${args_no_boolean_flags}`` expanded), then ``extra``."""
    out: list[str] = []
    for token in spec.get("command", DEFAULT_COMMAND):
        if token == "${env}":
            continue
        if token in ("${interpreter}", "python", "python3"):
            out.append(sys.executable)
        elif token == "${program}":
            out.append(spec["program"])
        elif token == "${args}":
            out += [f"--{k}={v}" for k, v in params.items()]
        elif token == "${args_no_hyphens}":
            out += [f"{k}={v}" for k, v in params.items()]
        elif token == "${args_no_boolean_flags}":
            out += [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False]
        else:
            out.append(token)
    return out + list(extra)


def with_resume(command: list[str]) -> list[str]:
    """``command`` with ``--resume`` right after the training script (flags follow it, overrides come later)."""
    at = next(i for i, tok in enumerate(command) if tok.endswith(".py")) + 1
    return [*command[:at], "--resume", *command[at:]]
