"""What a few-shot config must satisfy beyond the shared checks (:mod:`engine.config.checks`): the names and
ranges of its keys, its stages, and the ResNet-12's widths."""

from __future__ import annotations

from collections.abc import Mapping

from yacs.config import CfgNode as CN

from engine.config.checks import COUNT, DROP, NON_NEGATIVE, POSITIVE, UNIT, Range
from engine.config.errors import ConfigError

#: the stages a few-shot run trains, in their order
STAGES = ("pretrain", "meta")
#: ``MODEL.BACKBONE`` names of the few-shot family (modeling/exp_b1_model.build_exp_b1); "" fails when the model
#: is built, so that a config that builds none (a tool, a test) may leave it out.
FEWSHOT_BACKBONES = ("resnet12", "tiny_conv", "timm")

#: Ranges of the few-shot keys (:data:`engine.config.checks.RANGES` says how they are read); ``MODEL.NUM_CLASSES``
#: is narrowed: the classifier is never sized by the data.
RANGES: dict[str, Range] = {
    "MODEL.NUM_CLASSES": Range(1, note="the training classes"),
    "MODEL.BACKBONE_ARGS.CHANNELS": Range(1, integers=True, min_items=1, note="stage widths"),
    "MODEL.BACKBONE_ARGS.DROP_RATE": DROP,
    "MODEL.BACKBONE_ARGS.DROPBLOCK_SIZE": COUNT,
    "MODEL.BACKBONE_ARGS.DROPBLOCK_RAMP_STEPS": NON_NEGATIVE,
    "MODEL.METRIC_SCALE": POSITIVE,
    "MODEL.METRIC_TEMPERATURE": POSITIVE,
    "MODEL.SAP.LOGIT_SCALE_INIT": POSITIVE,
    "MODEL.SAP.LOGIT_SCALE_MAX": POSITIVE,
    "MODEL.SAP.PURIFY_INIT": Range(0, 1, low_open=True, high_open=True),
    "MODEL.SAP.ANCHOR_PROTO_WEIGHT": UNIT,
    "MODEL.SAP.LEARNED_DIM": COUNT,
    "MODEL.SAP.WORD_VOCAB_SIZE": COUNT,
    "FEWSHOT.IMAGE_SIZE": COUNT,
    "FEWSHOT.N_WAY": Range(2, note="classes per training episode"),
    "FEWSHOT.K_SHOT": COUNT,
    "FEWSHOT.N_QUERY": COUNT,
    "FEWSHOT.EPISODES_PER_EPOCH": COUNT,
    "FEWSHOT.TEST_WAY": Range(2, note="classes per test episode"),
    "FEWSHOT.TEST_SHOTS": Range(1, integers=True, min_items=1),
    "FEWSHOT.TEST_QUERY": COUNT,
    "FEWSHOT.TEST_EPISODES": COUNT,
    "FEWSHOT.VAL_EPISODES": COUNT,
    "FEWSHOT.CI_Z": POSITIVE,
    "FEWSHOT.PRETRAIN.EPOCHS": Range(0, note="0: no pre-training"),
    "FEWSHOT.PRETRAIN.BASE_LR": NON_NEGATIVE,
    "FEWSHOT.PRETRAIN.BATCH_SIZE": COUNT,
    "FEWSHOT.PRETRAIN.WARMUP_EPOCHS": NON_NEGATIVE,
    "FEWSHOT.TEXT_TOWER.EMBED_DIM": COUNT,
    "FEWSHOT.TEXT_TOWER.WIDTH": COUNT,
    "FEWSHOT.TEXT_TOWER.HIDDEN": COUNT,
    "FEWSHOT.TEXT_TOWER.STEPS": COUNT,
    "FEWSHOT.TEXT_TOWER.BATCH_SIZE": COUNT,
    "FEWSHOT.TEXT_TOWER.LR": POSITIVE,
    "FEWSHOT.TEXT_TOWER.WEIGHT_DECAY": NON_NEGATIVE,
    "FEWSHOT.TEXT_TOWER.TEMPERATURE": Range(0.01, 1.0, note="the initial softmax temperature"),
    "FEWSHOT.TEXT_TOWER.EPISODES": COUNT,
}

#: Keys that moved into ``MODEL``, with what a file naming them is told.
KEY_HINTS = {
    "FEWSHOT.NUM_TRAIN_CLASSES": "config key 'FEWSHOT.NUM_TRAIN_CLASSES' has moved: use MODEL.NUM_CLASSES",
    "FEWSHOT.METRIC_SCALE": "config key 'FEWSHOT.METRIC_SCALE' has moved: use MODEL.METRIC_SCALE",
    "FEWSHOT.METRIC_SCALE_LEARNABLE": "config key 'FEWSHOT.METRIC_SCALE_LEARNABLE' has moved: use "
                                      "MODEL.METRIC_SCALE_LEARNABLE",
    "FEWSHOT.BACKBONE": "config key 'FEWSHOT.BACKBONE' has moved: use MODEL.BACKBONE_ARGS (the same keys: CHANNELS, "
                        "DROP_RATE, DROPBLOCK_SIZE, DROPBLOCK_RAMP_STEPS, TIMM_NAME, WEIGHTS)",
}


def choices(cfg: CN) -> Mapping[str, tuple[str, ...]]:
    """The few-shot keys that take one of a few names, with those names."""
    from datasets.synthetic_generators import FEWSHOT_PRESETS
    from modeling.exp_b1_model import METRICS
    from modeling.module.semantic_anchor_purification import SCALE_MODES
    from modeling.module.semantic_anchors import ANCHOR_FALLBACKS, ANCHOR_MODES

    return {
        "MODEL.BACKBONE": FEWSHOT_BACKBONES,
        "MODEL.METRIC": METRICS,
        "MODEL.SAP.SCALE_MODE": SCALE_MODES,
        "MODEL.SAP.ANCHOR_MODE": ANCHOR_MODES,
        "MODEL.SAP.ANCHOR_FALLBACK": ANCHOR_FALLBACKS,
        "FEWSHOT.TEST_CHECKPOINT": ("last", "best"),
        "DATASETS.SYNTHETIC.PRESET": ("", *FEWSHOT_PRESETS),
    }


def check(cfg: CN) -> None:
    """The few-shot checks, run after the shared ones when a few-shot config loads."""
    stages = cfg.FEWSHOT.STAGES
    if any(st not in STAGES for st in stages) or list(stages) != sorted(set(stages), key=STAGES.index):
        raise ConfigError(f"config key 'FEWSHOT.STAGES' must list stages of {', '.join(STAGES)}, each once and in "
                          f"that order; got {list(stages)}")
    sap = cfg.MODEL.SAP
    if sap.TEXT_TOWER_RECIPE and not sap.TEXT_TOWER:
        raise ConfigError("MODEL.SAP.TEXT_TOWER_RECIPE needs MODEL.SAP.TEXT_TOWER: the file the name tower is written to")
    pre = cfg.FEWSHOT.PRETRAIN
    if pre.RECIPE:
        if not pre.CACHE_DIR:
            raise ConfigError("FEWSHOT.PRETRAIN.RECIPE needs FEWSHOT.PRETRAIN.CACHE_DIR: the folder its networks are "
                              "written to, one per seed")
        if "pretrain" in stages:
            raise ConfigError("FEWSHOT.PRETRAIN.RECIPE gives this run its pre-trained network: FEWSHOT.STAGES must not "
                              f"list 'pretrain' as well (got {list(stages)}; e.g. FEWSHOT.STAGES \"['meta']\")")
        if cfg.MODEL.WEIGHTS:
            raise ConfigError("MODEL.WEIGHTS and FEWSHOT.PRETRAIN.RECIPE both say what the run starts from: keep one")
    if cfg.MODEL.BACKBONE == "resnet12" and len(cfg.MODEL.BACKBONE_ARGS.CHANNELS) != 4:
        raise ConfigError(f"config key 'MODEL.BACKBONE_ARGS.CHANNELS' must list 4 stage widths for MODEL.BACKBONE "
                          f"resnet12; got {list(cfg.MODEL.BACKBONE_ARGS.CHANNELS)}")
