"""Pretrained pieces made on first use from a recipe (a config file), then reused: ReID's synthetic CLIP tower,
the few-shot family's class-name tower.

A piece is a file whose record says which recipe made it. :func:`ensure_made` makes it, when it is absent, by
calling the family's ``make(recipe, out, overrides)`` in a process of its own (its own seed, log, run folder
and lock; no process group of a DDP run), under a lock beside the file so that runs started side by side make
it once; a piece whose recorded recipe differs from what the recipe says now is refused, with the two ways out.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode as CN

from engine.config import ConfigError, config_to_dict, flatten, load_config
from engine.run_lock import file_lock

logger = logging.getLogger(__name__)

#: the folder beside a piece where its recipe trains
RUN_DIR = "run"
#: keys that say where and how a recipe runs, not what it trains
RUN_KEYS = ("OUTPUT_DIR", "WANDB", "DEVICE", "DATALOADER")


def recipe_record(cfg: CN) -> dict[str, Any]:
    """What identifies a recipe's product: its config without the keys of :data:`RUN_KEYS` (and the data root)."""
    record = config_to_dict(cfg)
    for key in RUN_KEYS:
        record.pop(key, None)
    record["DATASETS"].pop("ROOT_DIR", None)
    return record


def recipe_changes(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``KEY: recorded -> wanted`` for every recorded key whose value the recipe now changes (keys the
    repository gained since the piece was made are not changes)."""
    old, new = flatten(recorded), flatten(wanted)
    return [f"{k}: {old[k]!r} -> {new.get(k, '<no such key>')!r}" for k in sorted(old) if new.get(k, object()) != old[k]]


def record_beside(out: Path, name: str) -> dict[str, Any] | None:
    """The JSON record ``name`` beside the piece file ``out``, or ``None`` when either is absent or unreadable."""
    try:
        return json.loads((out.parent / name).read_text()) if out.is_file() else None
    except (OSError, ValueError):
        return None


def train_recipe(recipe: str, run_dir: Path, opts: Sequence[str], run: Callable[[CN, argparse.Namespace], Any],
                 resume: str | None = None) -> CN:
    """Train ``recipe`` (with ``opts``, which set ``OUTPUT_DIR`` to ``run_dir``) with the family's ``run(cfg, args)``
    unless ``run_dir`` holds a finished run; an interrupted one continues where it stopped. Sets this process up
    as a training script does (log file, seed, run-folder lock): call it from a process of its own. Returns the
    recipe's config."""
    from engine.checkpoint import Checkpointer
    from engine.defaults import FINISHED_MARKER, default_setup

    if (run_dir / FINISHED_MARKER).is_file():
        return load_config(recipe, list(opts))
    if resume is None and Checkpointer(run_dir).latest() is not None:
        resume = "auto"
    args = argparse.Namespace(config_file=recipe, opts=list(opts), resume=resume, eval_only=False, flag_keys={})
    cfg = default_setup(args)
    try:
        run(cfg, args)
    finally:
        if getattr(args, "run_lock", None) is not None:
            args.run_lock.release()
    return cfg


def ensure_made(out: Path, recipe: str, make: Callable[[str, str, list[str]], Any],
                read_record: Callable[[Path], dict[str, Any] | None], what: str, key: str,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The record of ``out`` (a ``what``, the file config key ``key`` names), made first from ``recipe`` (with
    ``overrides``, e.g. a seed) by ``make`` in a process of its own when absent; refused when made with another
    recipe."""
    if not Path(recipe).is_file():
        raise ConfigError(f"the recipe '{recipe}' of {key} does not exist")
    wanted = recipe_record(load_config(recipe, list(overrides)))
    with file_lock(out.parent / f".{out.name}.lock"):
        record = read_record(out)
        if record is None:
            logger.info("%s %s does not exist: pretraining it with %s (log: %s)", key, out, recipe,
                        out.parent / RUN_DIR / "log.txt")
            child = multiprocessing.get_context("spawn").Process(
                target=make, args=(recipe, str(out), [*overrides, "WANDB.MODE", "disabled"]), name=f"make {what}")
            child.start()
            child.join()
            record = read_record(out)
            if child.exitcode != 0 or record is None:
                raise ConfigError(f"making the {what} {out} with {recipe} failed (exit {child.exitcode}); see "
                                  f"{out.parent / RUN_DIR / 'log.txt'}")
        changed = recipe_changes(record["recipe"], wanted)
        if changed:
            raise ConfigError(
                f"{out} was made with another recipe than {recipe} ({', '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''}): delete {out} to make it again, or point {key} elsewhere")
    return record
