#!/usr/bin/env python
"""Multi-modal ReID (DeMo / DeMo-SDTPS) training and evaluation.

    python train_net.py --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml \
        [--init_scale 0.5 --init_bias 0.5] [--resume [PATH]] [--eval-only] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

from engine.defaults import default_argument_parser, default_setup, main_entry
from engine.reid.family import REID


def main(args: argparse.Namespace) -> None:
    """Set up the run folder and config, then train or evaluate (engine/reid/run.py)."""
    cfg = default_setup(args)
    REID.runner()(cfg, args)


if __name__ == "__main__":
    sys.exit(main_entry(main, default_argument_parser(__doc__, family=REID)))
