#!/usr/bin/env python
"""Pretrain the CLIP image tower on a synthetic set and export it for ``MODEL.PRETRAIN_PATH``.

    python tools/pretrain_tower.py --config_file configs/synthetic/Pretrain_tower_small.yml \\
        --out data/pretrained/clip_vit_small/tower.pt [KEY VALUE ...]

Trains the recipe (a DeMo / DeMo_SDTPS config; engine/reid/tower_pretrain.py) in ``<out's folder>/run/``
(resumed if interrupted, skipped if finished), then writes ``--out`` (the tower's ``visual.*`` tensors),
``open_clip_config.json`` and ``pretrain.json`` beside it. A ReID config whose ``MODEL.PRETRAIN_RECIPE``
names the recipe runs the same function on first use.
"""

from __future__ import annotations

import argparse
import sys

from engine.defaults import default_argument_parser, main_entry, overrides_from_args
from engine.reid.tower_pretrain import pretrain_tower


def main(args: argparse.Namespace) -> None:
    """Pretrain (unless finished) and export the tower."""
    results = pretrain_tower(args.config_file, args.out, overrides_from_args(args), resume=args.resume)
    print(f"pretrained tower: {args.out} (test mAP {100 * results.get('mAP', float('nan')):.2f}%)")


def build_parser() -> argparse.ArgumentParser:
    """The training scripts' arguments and ``--out``."""
    parser = default_argument_parser(__doc__)
    parser.add_argument("--out", required=True, metavar="FILE", help="the tower file to write (MODEL.PRETRAIN_PATH)")
    return parser


if __name__ == "__main__":
    sys.exit(main_entry(main, build_parser()))
