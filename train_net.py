#!/usr/bin/env python
"""Multi-modal ReID (DeMo / DeMo-SDTPS) training and evaluation.

    python train_net.py --config_file configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml \
        [--init_scale 0.5 --init_bias 0.5] [--resume [PATH]] [--eval-only] [KEY VALUE ...]
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
    raise NotImplementedError("ReID training loop")  # pragma: no cover - replaced by the ReID issue


if __name__ == "__main__":
    sys.exit(main_entry(main, default_argument_parser(__doc__, gate_flags=True)))
