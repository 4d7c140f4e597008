#!/usr/bin/env python
"""Few-shot ExpB1 + SAP training (pre-training and episodic meta-training) and episode evaluation.

    python train_b1_improvement.py --config_file configs/miniImageNet/ExpB1_SAP.yml \
        [--resume [PATH]] [--eval-only] [KEY VALUE ...]
"""

from __future__ import annotations

import sys

from engine.defaults import default_argument_parser, main_entry
from engine.fewshot import main

if __name__ == "__main__":
    sys.exit(main_entry(main, default_argument_parser(__doc__, gate_flags=False)))
