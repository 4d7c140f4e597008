"""What both entry scripts do before training: parse arguments, build the config, prepare the run folder."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.config import ConfigError, load_config
from engine.family import Family
from engine.launch import launch
from engine.logger import setup_logging
from engine.run_lock import RunFolderError, RunFolderLock
from engine.seed import seed_everything
from utils.distributed import barrier, get_rank, is_main_process
from utils.errors import UserError
from utils.io import atomic_write_text

logger = logging.getLogger(__name__)

FINISHED_MARKER = "summary.json"  # written last by a run that completed
#: set to 1 (or pass --debug) to see the traceback of a user error
DEBUG_ENV = "TRAIN_DEBUG"


def default_argument_parser(description: str, family: Family | None = None) -> argparse.ArgumentParser:
    """``--config_file``, ``--resume [PATH]``, ``--eval-only`` and trailing ``KEY VALUE`` overrides, plus the
    command-line flags of ``family`` (``Family.add_arguments``: e.g. ReID's ``--init_scale``/``--init_bias``)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. SOLVER.BASE_LR 1e-4 OUTPUT_DIR outputs/run1",
    )
    parser.add_argument("--config_file", "--config-file", default="", metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue a run: without PATH from the newest checkpoint in OUTPUT_DIR, else from PATH",
    )
    parser.add_argument("--eval-only", "--eval_only", action="store_true", help="evaluate only (with --resume or MODEL.WEIGHTS)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error caused by the input (also: {DEBUG_ENV}=1)")
    flag_keys = family.add_arguments(parser) if family is not None else {}
    parser.set_defaults(flag_keys=dict(flag_keys))
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Trailing overrides (``KEY VALUE`` or ``KEY=VALUE``) plus the keys named flags map to (flags win)."""
    opts: list[str] = []
    for token in args.opts or []:
        if token == "--":
            continue
        if token.startswith("--"):
            raise ConfigError(f"'{token}' comes after the KEY VALUE overrides, which end the command line: put "
                              f"options first (train_net.py --config_file FILE {token} ... KEY VALUE ...)")
        if "=" in token and token.split("=", 1)[0].replace(".", "").replace("_", "").isupper():
            opts += token.split("=", 1)  # KEY=VALUE, as W&B's ${args_no_hyphens} writes them
        else:
            opts.append(token)
    for flag, key in getattr(args, "flag_keys", {}).items():
        value = getattr(args, flag, None)
        if value is not None:
            opts += [key, repr(value)]
    return opts


def check_output_dir(output_dir: Path, resume: str | None, eval_only: bool) -> None:
    """Refuse to start a fresh run in a folder that already holds one (finished or not)."""
    if resume is not None or eval_only or not output_dir.exists():
        return
    if (output_dir / FINISHED_MARKER).exists():
        raise RunFolderError(
            f"OUTPUT_DIR {output_dir} already holds a finished run ({FINISHED_MARKER}); "
            "pass --resume to continue it, --eval-only to re-evaluate, or choose another OUTPUT_DIR"
        )
    checkpoints = sorted(output_dir.glob("checkpoint_*.pth"))
    if checkpoints:
        raise RunFolderError(
            f"OUTPUT_DIR {output_dir} already holds an unfinished run ({checkpoints[-1].name}); "
            "pass --resume to continue it or choose another OUTPUT_DIR"
        )


def refuse_finished_resume(output_dir: Path, checkpoint: dict[str, Any], stage_epochs: Sequence[tuple[str, int]]) -> None:
    """``--resume`` of a finished run (``summary.json``) whose config asks for no more epochs than the checkpoint
    holds: there is nothing to train, and rewriting its results would lose them, so the command stops before
    writing anything. ``stage_epochs``: the run's stages in order with the epochs the config asks of each."""
    from engine.trainer import RunState, epochs_done, run_state_of

    if not (output_dir / FINISHED_MARKER).is_file():
        return
    run = RunState(**run_state_of(checkpoint))
    names = [name for name, _ in stage_epochs]
    progress = []
    for name, epochs in stage_epochs:
        done = epochs_done(run, names, name, epochs)
        if done < epochs:
            return  # the schedule grew: the run trains on and writes new results
        progress.append(f"{name}: {done} of {epochs} epochs")
    raise RunFolderError(
        f"OUTPUT_DIR {output_dir} holds a finished run and --resume has nothing left to train ({'; '.join(progress)}); "
        "nothing was changed. Raise SOLVER.MAX_EPOCHS to train it further, or evaluate it with --eval-only")


def save_config(cfg: CN, output_dir: Path) -> Path:
    """Write the resolved config as ``config.yaml``; a differing existing one is kept, the new one dated."""
    text = cfg.dump()
    path = output_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        path = output_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        logger.warning("config differs from the run's original config.yaml; saved this one as %s", path.name)
    atomic_write_text(path, text)
    return path


def default_setup(args: argparse.Namespace) -> CN:
    """Load and freeze the config, check and create the run folder, set up logging, seed, save the config."""
    cfg = load_config(args.config_file or None, overrides_from_args(args), freeze=False)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):  # started by `wandb agent`
        cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / f"sweep-{os.environ['WANDB_SWEEP_ID']}" / os.environ["WANDB_RUN_ID"])
    cfg.freeze()
    output_dir = Path(cfg.OUTPUT_DIR)
    if is_main_process():  # the run owns its folder until it ends; a second run there is refused
        args.run_lock = RunFolderLock(output_dir).acquire()
    check_output_dir(output_dir, args.resume, args.eval_only)
    barrier()  # every rank checked before rank 0 writes anything
    setup_logging(output_dir)
    lock = getattr(args, "run_lock", None)
    if lock is not None and lock.took_over:
        logger.info(lock.took_over)
    logger.info("command: %s", " ".join(sys.argv))
    if is_main_process():
        logger.info("config saved to %s", save_config(cfg, output_dir))
    seed_everything(cfg.SEED + get_rank(), deterministic=cfg.DETERMINISTIC, attention=cfg.DETERMINISTIC_ATTENTION,
                    fill_uninitialized=cfg.DETERMINISTIC_FILL_UNINITIALIZED)
    if cfg.DEVICE.CPU_THREADS > 0:  # the run's numbers on a CPU then depend on this key, not on the machine
        torch.set_num_threads(cfg.DEVICE.CPU_THREADS)
        logger.info("torch intra-op CPU threads: %d (DEVICE.CPU_THREADS)", cfg.DEVICE.CPU_THREADS)
    return cfg


#: errors the user can fix from their one-line message (every package's error classes derive from UserError)
USER_ERRORS = (UserError, FileNotFoundError)


def user_message(err: BaseException) -> str:
    """The one line a user sees for ``err``: for an error re-raised from a data loader worker, the
    worker's own message rather than the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = type(err).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run ``argv`` started: the same, with ``--resume``."""
    args = list(argv)
    if "--resume" not in args:
        at = args.index("--config_file") + 2 if "--config_file" in args else 1
        args.insert(min(at, len(args)), "--resume")
    return " ".join(["python", *args])


def run_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``main`` under :func:`launch`; user errors print one clear line and exit 2 (no traceback);
    a run stopped by a stop signal (SIGINT, SIGTERM, SIGUSR1) prints where its checkpoint is and how to resume
    (exit 130)."""
    from engine.trainer import RunInterrupted

    try:
        launch(main, args)
    except USER_ERRORS as err:
        if getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        where = f"saved {stop.checkpoint}" if stop.checkpoint is not None else "no checkpoint written"
        print(f"stopped by {stop}: {where}; resume with:\n  {resume_command(sys.argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted with no checkpoint of this moment; --resume continues from the run's last checkpoint, "
              "if it has one", file=sys.stderr)
        return 130
    return 0


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, treating ``--resume KEY VALUE ...`` as a bare ``--resume`` followed by overrides.

    ``--resume`` takes an optional path, so argparse would swallow a following config key
    (``--resume SOLVER.MAX_EPOCHS 60``) as the path; a value that looks like a config key
    (upper-case dotted name, no path separator, not an existing file) is handed back.
    """
    args = parser.parse_args(argv)
    value = args.resume
    if value not in (None, "auto") and "/" not in value and not Path(value).exists():
        key = value.split("=", 1)[0]
        if key.replace(".", "").replace("_", "").isupper():
            args.opts = [value, *(args.opts or [])]
            args.resume = "auto"
    return args


def main_entry(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call :func:`run_cli`; the body of both training scripts."""
    return run_cli(main, parse_args(parser, argv))
