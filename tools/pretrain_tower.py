#!/usr/bin/env python
"""Pretrain the CLIP image tower on a synthetic set and export it for ``MODEL.PRETRAIN_PATH``.

    python tools/pretrain_tower.py --config_file configs/synthetic/Pretrain_tower_small.yml \\
        --out data/pretrained/clip_vit_small/tower.pt [KEY VALUE ...]

Trains the recipe (a DeMo / DeMo_SDTPS config, engine/tower_pretrain.py) in ``<out's folder>/run/``
(resumed if interrupted, skipped if finished), then writes ``--out`` (the tower's ``visual.*``
tensors), ``open_clip_config.json`` and ``pretrain.json`` beside it. A ReID config whose
``MODEL.PRETRAIN_RECIPE`` names the recipe runs this on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yacs.config import CfgNode as CN

from engine.checkpoint import Checkpointer
from engine.config import ConfigError
from engine.defaults import FINISHED_MARKER, default_argument_parser, default_setup, main_entry
from engine.tower_pretrain import RUN_DIR, export_tower


def main(args: argparse.Namespace) -> None:
    """Train the recipe into ``<out>/../run`` unless finished there, then export the tower."""
    out = Path(args.out)
    run_dir = out.parent / RUN_DIR
    args.opts = [*(args.opts or []), "OUTPUT_DIR", str(run_dir)]
    finished = (run_dir / FINISHED_MARKER).is_file()
    if args.resume is None and not finished and Checkpointer(run_dir).latest() is not None:
        args.resume = "auto"  # an interrupted pretraining continues where it stopped
    cfg = default_setup(args) if not finished else _finished_config(args)
    if cfg.MODEL.PRETRAIN_RECIPE:
        raise ConfigError(f"{args.config_file} names a MODEL.PRETRAIN_RECIPE itself: a recipe trains from "
                          "MODEL.PRETRAIN_PATH or random init, it does not chain another pretraining")
    if not finished:
        from engine.reid import run_reid

        run_reid(cfg, args)
    summary = json.loads((run_dir / FINISHED_MARKER).read_text())
    export_tower(cfg, run_dir, out, {k: summary[k] for k in ("mAP", "rank1", "mINP") if k in summary})
    print(f"pretrained tower: {out} (test mAP {100 * summary.get('mAP', float('nan')):.2f}%)")


def _finished_config(args: argparse.Namespace) -> CN:
    """The recipe's config for a pretraining that already finished (no run folder set-up needed)."""
    from engine.config import load_config
    from engine.defaults import overrides_from_args

    return load_config(args.config_file or None, overrides_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(__doc__)
    parser.add_argument("--out", required=True, metavar="FILE", help="the tower file to write (MODEL.PRETRAIN_PATH)")
    return parser


if __name__ == "__main__":
    sys.exit(main_entry(main, build_parser()))
