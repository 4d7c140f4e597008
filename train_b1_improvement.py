#!/usr/bin/env python
"""Few-shot ExpB1 + SAP training (pre-training and episodic meta-training) and episode evaluation.

    python train_b1_improvement.py --config_file configs/miniImageNet/ExpB1_SAP.yml \
        [--resume [PATH]] [--eval-only] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

from engine.defaults import default_argument_parser, default_setup, main_entry
from modeling import build_model


def main(args: argparse.Namespace) -> None:
    """Build config, model and data through the registries, then train or evaluate."""
    cfg = default_setup(args)
    build_model(cfg)
    raise NotImplementedError("few-shot training loop")  # pragma: no cover - replaced by the ExpB1 issue


if __name__ == "__main__":
    sys.exit(main_entry(main, default_argument_parser(__doc__, gate_flags=False)))
