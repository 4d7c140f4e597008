"""What a ReID config must satisfy beyond the shared checks (:mod:`engine.config.checks`): the names and ranges
of the ReID keys, P x K batches, DeMo's module switches, the cosine gate's bound, image sizes against the
ViT's patch grid, and ``TEST.MISS``; and what DeMo's key names are called here."""

from __future__ import annotations

from collections.abc import Mapping

from yacs.config import CfgNode as CN

from engine.config.checks import COUNT, DROP, NON_NEGATIVE, POSITIVE, SIZE, UNIT, Range, get_key
from engine.config.errors import ConfigError

#: ``MODEL.BACKBONE`` names of the ReID family and the open_clip tower each builds ("" = ViT-B-16)
BACKBONE_ARCHS = {"clip_vit_b16": "ViT-B-16", "": "ViT-B-16", "clip_vit_tiny": "ViT-tiny",
                  "clip_vit_small": "ViT-small-8"}

#: Ranges of the ReID keys (:data:`engine.config.checks.RANGES` says how they are read).
RANGES: dict[str, Range] = {
    "MODEL.NUM_CAMERAS": Range(0, note="0: set from the data set"),
    "MODEL.DEMO.HEAD": COUNT,
    "MODEL.DEMO.HDM_DROPOUT": DROP,
    "MODEL.SDTPS.NUM_HEADS": COUNT,
    "MODEL.SDTPS.KEEP_RATIO": Range(0, 1, low_open=True, note="the fraction of patch tokens kept"),
    "MODEL.SDTPS.GATE_PARAM_BOUND": POSITIVE,
    "DATASETS.SYNTHETIC.MISSING_MODALITY_PROB": Range(high=1, note="< 0: the preset's"),
    "DATALOADER.NUM_INSTANCE": Range(1, note="K, the images of one identity in a P x K batch"),
    "SOLVER.BIAS_LR_FACTOR": NON_NEGATIVE,
    "SOLVER.WEIGHT_DECAY_BIAS": NON_NEGATIVE,
    "INPUT.SIZE_TRAIN": SIZE,
    "INPUT.SIZE_TEST": SIZE,
    "INPUT.PROB": UNIT,
    "INPUT.PADDING": NON_NEGATIVE,
    "INPUT.RE_PROB": UNIT,
    "INPUT.PIXEL_STD": Range(0, low_open=True, min_items=1),
    "LOSS.ID_WEIGHT": NON_NEGATIVE,
    "LOSS.ID_LABEL_SMOOTHING": Range(0, 1, high_open=True),
    "LOSS.TRIPLET_WEIGHT": NON_NEGATIVE,
    "LOSS.TRIPLET_MARGIN": NON_NEGATIVE,
    "LOSS.SDM.WEIGHT": NON_NEGATIVE,
    "LOSS.SDM.INIT_TEMPERATURE": POSITIVE,
    "LOSS.SDM.FINAL_TEMPERATURE": POSITIVE,
    "LOSS.SDM.FALLBACK_TEMPERATURE": POSITIVE,
    "LOSS.SDM.ANNEAL_EPOCHS": NON_NEGATIVE,
    "LOSS.SDM.FALLBACK_STEPS": NON_NEGATIVE,
    "LOSS.SDM.MIN_TEMPERATURE": POSITIVE,
    "LOSS.SDM.MAX_TEMPERATURE": POSITIVE,
    "LOSS.FEAT_NORM.TARGET": POSITIVE,
    "LOSS.FEAT_NORM.BAND": NON_NEGATIVE,
    "LOSS.FEAT_NORM.WEIGHT": NON_NEGATIVE,
    "LOSS.CEM.ATTN_HIDDEN": COUNT,
    "LOSS.CEM.TAU": POSITIVE,
    "LOSS.CEM.BETA": POSITIVE,
    "LOSS.CEM.SNR_THRESH": NON_NEGATIVE,
    "LOSS.CEM.SNR_SHARP": POSITIVE,
    "LOSS.CEM.CLASS_GATE_A": POSITIVE,
    "LOSS.CEM.CLASS_GATE_B": UNIT,
    "LOSS.CEM.SLOT_POWER": NON_NEGATIVE,
    "LOSS.CEM.LOSS_SCALE": NON_NEGATIVE,
    "LOSS.CEM.WARMUP_EPOCHS": NON_NEGATIVE,
    "LOSS.CEM.LR": NON_NEGATIVE,
    "TEST.RE_RANKING_K1": COUNT,
    "TEST.RE_RANKING_K2": Range(1, note="1: no query expansion"),
    "TEST.RE_RANKING_LAMBDA": UNIT,
    "TEST.MAX_RANK": COUNT,
    "TEST.VIS_QUERIES": NON_NEGATIVE,
}

def _check_vit_shapes(cfg: CN) -> None:
    """For a CLIP tower this repository knows (:data:`BACKBONE_ARCHS`): each side of
    ``INPUT.SIZE_TRAIN`` / ``SIZE_TEST`` a multiple of its patch size, both sizes giving the one patch grid its
    positional embedding is built for, and the heads of ATM and SDTPS dividing its token width."""
    from modeling.backbones.clip_vit import CLIP_VIT_CONFIGS

    arch = BACKBONE_ARCHS.get(cfg.MODEL.BACKBONE)
    if arch is None:
        return
    tower = CLIP_VIT_CONFIGS[arch]
    patch, width = int(tower["vision_cfg"]["patch_size"]), int(tower["embed_dim"])
    name = cfg.MODEL.BACKBONE or "''"
    named = f"MODEL.BACKBONE {name} ({arch})"
    grids = []
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST"):
        size = list(get_key(cfg, key))
        if size[0] % patch or size[1] % patch:
            fit = [max(patch, round(side / patch) * patch) for side in size]
            raise ConfigError(f"config key '{key}' must hold multiples of the patch size {patch} of {named}, e.g. "
                              f"{fit}; got {size}")
        grids.append((size[0] // patch, size[1] // patch))
    if grids[0] != grids[1]:
        (h, w), (th, tw) = grids
        raise ConfigError(
            f"config key 'INPUT.SIZE_TEST' must give the {h} x {w} patch grid of INPUT.SIZE_TRAIN "
            f"{list(cfg.INPUT.SIZE_TRAIN)}, the one the positional embedding of {named} is built for; got "
            f"{list(cfg.INPUT.SIZE_TEST)} ({th} x {tw} patches of {patch} px)")
    heads = ["MODEL.DEMO.HEAD"] if cfg.MODEL.DEMO.ATM else []
    if cfg.MODEL.SDTPS.ENABLED and cfg.MODEL.NAME != "DeMo":  # DeMo runs without SDTPS whatever ENABLED says
        heads.append("MODEL.SDTPS.NUM_HEADS")
    for key in heads:
        value = get_key(cfg, key)
        if width % value:
            raise ConfigError(f"config key '{key}' must divide the {width}-d tokens of {named}; got {value}")


def check(cfg: CN) -> None:
    """The ReID checks, run after the shared ones when a ReID config loads."""
    from engine.reid.missing import missing_modalities

    try:
        missing_modalities(cfg.TEST.MISS)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_combinations(cfg)
    _check_vit_shapes(cfg)


def choices(cfg: CN) -> Mapping[str, tuple[str, ...]]:
    """The ReID keys that take one of a few names, with those names."""
    from datasets.synthetic_generators import RGBNT_PRESETS

    return {
        "MODEL.BACKBONE": tuple(name for name in BACKBONE_ARCHS if name),
        "TEST.MISS_MODE": ("mask", "zero"),
        "TEST.METRIC": ("euclidean", "cosine"),
        "INPUT.TEST_INTERPOLATION": ("bicubic", "bilinear"),
        "MODEL.SIE_TOKENS": ("cls", "all"),
        "LOSS.SDM.FORMULA": ("fixed", "legacy"),
        "DATASETS.SYNTHETIC.PRESET": ("", *RGBNT_PRESETS),
    }


def _check_combinations(cfg: CN) -> None:
    """ReID settings that are each fine but cannot be used together."""
    s = cfg.SOLVER
    if not cfg.DATALOADER.REDEAL_LEFTOVERS and s.SCHEDULER != "timm_cosine":
        raise ConfigError(f"DATALOADER.REDEAL_LEFTOVERS False gives epochs of varying length, which a per-step "
                          f"schedule (SOLVER.SCHEDULER {s.SCHEDULER}) cannot count; use SOLVER.SCHEDULER timm_cosine")
    batch, k = s.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE  # P x K identity batches (K >= 1: a range)
    if batch % k:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH ({batch}) must be a multiple of DATALOADER.NUM_INSTANCE ({k}): a batch is P "
            f"identities x K images; e.g. SOLVER.IMS_PER_BATCH {k * max(1, batch // k)}"
        )
    if cfg.MODEL.DEMO.ATM and not cfg.MODEL.DEMO.HDM:
        raise ConfigError("MODEL.DEMO.ATM needs MODEL.DEMO.HDM (the experts mix the seven HDM features); got "
                          "MODEL.DEMO.ATM True with MODEL.DEMO.HDM False")
    bound = cfg.MODEL.SDTPS.GATE_PARAM_BOUND
    for key in ("GATE_INIT_SCALE", "GATE_INIT_BIAS"):
        value = cfg.MODEL.SDTPS[key]
        if abs(value) > bound:
            raise ConfigError(f"config key 'MODEL.SDTPS.{key}' must lie in [-MODEL.SDTPS.GATE_PARAM_BOUND, "
                              f"MODEL.SDTPS.GATE_PARAM_BOUND] ([-{bound:g}, {bound:g}]); got {value!r}")


#: Keys of the published DeMo code that live under another name here (README, "Coming from DeMo"). Keys
#: with DeMo's name and meaning (INPUT.PROB, TEST.MISS, DATALOADER.NUM_INSTANCE, ...) are not listed.
DEMO_KEYS: dict[str, str] = {
    "MODEL.HEAD": "MODEL.DEMO.HEAD",
    "MODEL.DIRECT": "MODEL.DEMO.DIRECT (True / False for DeMo's 1 / 0)",
    "MODEL.GLOBAL_LOCAL": "MODEL.DEMO.GLOBAL_LOCAL",
    "MODEL.HDM": "MODEL.DEMO.HDM",
    "MODEL.ATM": "MODEL.DEMO.ATM",
    "MODEL.ID_LOSS_WEIGHT": "LOSS.ID_WEIGHT",
    "MODEL.TRIPLET_LOSS_WEIGHT": "LOSS.TRIPLET_WEIGHT",
    "MODEL.NO_MARGIN": "LOSS.TRIPLET_SOFT_MARGIN",
    "MODEL.IF_LABELSMOOTH": "LOSS.ID_LABEL_SMOOTHING (the epsilon: 0.1 for DeMo's 'on', 0.0 for 'off')",
    "MODEL.PRETRAIN_PATH_T": "MODEL.PRETRAIN_PATH (the local CLIP weights file)",
    "MODEL.TRANSFORMER_TYPE": "MODEL.BACKBONE (clip_vit_b16 for DeMo's ViT-B-16)",
    "MODEL.DEVICE": "DEVICE.NAME",
    "MODEL.DEVICE_ID": "no key: set CUDA_VISIBLE_DEVICES in the environment",
    "MODEL.STRIDE_SIZE": "no key: the patch stride is the patch size, 16, as in every DeMo config",
    "MODEL.NECK": "no key: the BNNeck is always on, as in DeMo (whose code ignores MODEL.NECK)",
    "MODEL.METRIC_LOSS_TYPE": "no key: ID + triplet always, as in every DeMo config",
    "SOLVER.OPTIMIZER_NAME": "SOLVER.OPTIMIZER",
    "SOLVER.WARMUP_ITERS": "SOLVER.WARMUP_EPOCHS (DeMo counts its warm-up in epochs too)",
    "SOLVER.WARMUP_METHOD": "no key: the warm-up is linear, as DeMo's",
    "SOLVER.SEED": "SEED",
    "SOLVER.MARGIN": "LOSS.TRIPLET_MARGIN (used when LOSS.TRIPLET_SOFT_MARGIN is False)",
    "TEST.NECK_FEAT": "no key: the test feature is taken before the BNNeck, which is what DeMo's code does "
                      "whatever TEST.NECK_FEAT says",
    "TEST.WEIGHT": "MODEL.WEIGHTS",
    "DATALOADER.SAMPLER": "no key: training samples P x K identities (DeMo's softmax_triplet)",
}


def _demo_hint(key: str, place: str) -> str:
    where = f"has {place}" if place.startswith("no key") else f"is {place} here"
    return f"DeMo's config key '{key}' {where}"


#: what a DeMo user who types one of :data:`DEMO_KEYS` is told
KEY_HINTS = {key: _demo_hint(key, place) for key, place in DEMO_KEYS.items()}
