"""The ReID family's registration: what the engine's core knows of it (no model or data loads here)."""

from __future__ import annotations

import argparse

from engine.family import Family, register_family
from engine.reid import checks
from engine.reid.config import add_reid_config

#: the cosine gate's command-line flags of ``train_net.py`` and the keys they set
GATE_FLAGS = {
    "init_scale": "MODEL.SDTPS.GATE_INIT_SCALE",
    "init_bias": "MODEL.SDTPS.GATE_INIT_BIAS",
    "use_gate_norm": "MODEL.SDTPS.USE_GATE_NORM",
    "renormalize_attn": "MODEL.SDTPS.RENORMALIZE_ATTN",
}


def str2bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` as a bool (an argparse type)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got '{text}'")


def add_gate_arguments(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--init_scale``/``--init_bias`` (the cosine gate's initial scale and bias) and the gate's two options."""
    parser.add_argument("--init_scale", type=float, default=None, help="cosine gate scale init (MODEL.SDTPS.GATE_INIT_SCALE)")
    parser.add_argument("--init_bias", type=float, default=None, help="cosine gate bias init (MODEL.SDTPS.GATE_INIT_BIAS)")
    parser.add_argument("--use_gate_norm", type=str2bool, default=None, metavar="BOOL",
                        help="LayerNorm over heads of the gate logits (MODEL.SDTPS.USE_GATE_NORM)")
    parser.add_argument("--renormalize_attn", type=str2bool, default=None, metavar="BOOL",
                        help="renormalise gated attention rows to sum 1 (MODEL.SDTPS.RENORMALIZE_ATTN)")
    return GATE_FLAGS


REID = register_family(Family(
    name="reid",
    label="ReID",
    script="train_net.py",
    models=("DeMo", "DeMo_SDTPS"),
    datasets=("RGBNT201", "RGBNT100", "MSVR310", "synthetic_rgbnt"),
    add_config=add_reid_config,
    run="engine.reid.run:run_reid",
    choices=checks.choices,
    ranges=checks.RANGES,
    check=checks.check,
    key_hints=checks.KEY_HINTS,
    add_arguments=add_gate_arguments,
))
