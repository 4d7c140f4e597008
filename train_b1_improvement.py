#!/usr/bin/env python
"""Few-shot ExpB1 + SAP training (pre-training and episodic meta-training) and episode evaluation.

    python train_b1_improvement.py --config_file configs/miniImageNet/ExpB1_SAP.yml \
        [--resume [PATH]] [--eval-only] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

from engine.defaults import default_argument_parser, default_setup, main_entry
from engine.fewshot.family import FEWSHOT


def main(args: argparse.Namespace) -> None:
    """Set up the run folder and config, then train or evaluate (engine/fewshot/run.py)."""
    cfg = default_setup(args)
    FEWSHOT.runner()(cfg, args)


if __name__ == "__main__":
    sys.exit(main_entry(main, default_argument_parser(__doc__, family=FEWSHOT)))
