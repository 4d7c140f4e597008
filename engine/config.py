"""The one configuration schema (yacs) and its loader.

Why here and not in ``configs/``: the schema is code that the engine owns and
every tool imports, while ``configs/`` holds only data (YAML files, one folder
per dataset, plus ``sweeps/``). Keeping the schema out of ``configs/`` means
that folder never needs to be a Python package.

Loading order: defaults below -> the ``_BASE_`` chain of the YAML file (base
first, paths relative to the file that names them) -> the file itself ->
``KEY VALUE`` overrides from the command line. Every key must exist in the
schema and every value must have the default's type; errors name the key, the
expected type and where the bad value came from. The result is frozen.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode as CN

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names key and source."""


#: Keys that no longer exist, with where their setting lives now; an old file naming one gets this text.
MOVED_KEYS: dict[str, str] = {
    "MODEL.QUICK_GELU": "MODEL.CLIP_ACTIVATION (auto | quick_gelu | gelu; auto reads the activation from the "
                        "weights file and is right for OpenAI's ViT-B-16.pt)",
}

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
    "SOLVER.BIAS_LR_FACTOR": "no key: biases train at their group's learning rate without weight decay",
    "SOLVER.WEIGHT_DECAY_BIAS": "no key: biases train at their group's learning rate without weight decay",
    "SOLVER.LARGE_FC_LR": "no key: classifiers train at SOLVER.BASE_LR",
    "TEST.NECK_FEAT": "no key: the test feature is taken before the BNNeck, which is what DeMo's code does "
                      "whatever TEST.NECK_FEAT says",
    "TEST.WEIGHT": "MODEL.WEIGHTS",
    "DATALOADER.SAMPLER": "no key: training samples P x K identities (DeMo's softmax_triplet)",
}


def get_default_config() -> CN:
    """Return a fresh, mutable copy of every key with its default value."""
    return _C.clone()


# ---------------------------------------------------------------------------
# Schema. Every magic number of the design notes lives here with its value.
# ---------------------------------------------------------------------------
_C = CN()
_C.OUTPUT_DIR = "outputs/default"
_C.SEED = 0
# Deterministic kernels (slower); for bit-reproducible debugging runs.
_C.DETERMINISTIC = False

_C.DEVICE = CN()
_C.DEVICE.NAME = "auto"  # auto | cpu | cuda
# Autocast precision: auto (bf16 on CUDA with bf16 support, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
_C.DEVICE.PRECISION = "auto"

_C.MODEL = CN()
_C.MODEL.NAME = ""  # ExpB1 | DeMo | DeMo_SDTPS
_C.MODEL.BACKBONE = ""
# Local path to CLIP image-tower weights (OpenAI ViT-B-16.pt or an open_clip checkpoint); "" = random init.
_C.MODEL.PRETRAIN_PATH = ""
# Local path to CLIP weights whose text tower gives SAP's semantic anchors; "" = no text tower.
_C.MODEL.CLIP_WEIGHTS = ""
# Activation both CLIP towers are built with: auto (read from the weights file: QuickGELU for OpenAI's
# files, an open_clip_config.json's quick_gelu; QuickGELU at random init) | quick_gelu | gelu.
_C.MODEL.CLIP_ACTIVATION = "auto"
# A checkpoint of this repository (or one tools/convert_demo_checkpoint.py wrote): evaluated by --eval-only
# when no --resume checkpoint is given; the starting weights of a training run (fine-tuning) otherwise.
_C.MODEL.WEIGHTS = ""
# torch.compile the training model: "" (eager) | default | max-autotune-no-cudagraphs | reduce-overhead
_C.MODEL.COMPILE = ""

_C.MODEL.SDTPS = CN()
_C.MODEL.SDTPS.ENABLED = True
_C.MODEL.SDTPS.NUM_HEADS = 4
_C.MODEL.SDTPS.KEEP_RATIO = 0.5
_C.MODEL.SDTPS.GATE_INIT_SCALE = 0.5  # seed 001: new init (old: 1.0)
_C.MODEL.SDTPS.GATE_INIT_BIAS = 0.5  # seed 001: new init (old: 0.0)
_C.MODEL.SDTPS.USE_GATE_NORM = False
_C.MODEL.SDTPS.RENORMALIZE_ATTN = False
# Gate scale and bias are clamped to [-bound, bound] in the forward (seed 003: at most [-5, 5]).
_C.MODEL.SDTPS.GATE_PARAM_BOUND = 5.0

# ReID (DeMo, DeMo_SDTPS). MODEL.BACKBONE "" means clip_vit_b16; clip_vit_tiny is the CPU test tower,
# clip_vit_small the GPU-ablation tower (random init).
# The patch grid follows INPUT.SIZE_TRAIN (256x128 -> 16x8 patches of 16 px).
_C.MODEL.NUM_CLASSES = 0  # training identities; 0 = set by the trainer from the dataset
_C.MODEL.NUM_CAMERAS = 0  # rows of the SIE table; 0 = set by the trainer from the dataset
_C.MODEL.SIE_CAMERA = True  # learnable camera embedding (SIE) added to the tokens
_C.MODEL.SIE_COE = 1.0  # SIE coefficient (DeMo's RGBNT201/RGBNT100/MSVR310 configs: 1.0)
_C.MODEL.SIE_TOKENS = "cls"  # cls (DeMo, CLIP-ReID) | all (TransReID style)
_C.MODEL.DEMO = CN()
_C.MODEL.DEMO.GLOBAL_LOCAL = True  # [CLS, mean(patches)] -> LN -> Linear(2D, D) -> QuickGELU per modality
_C.MODEL.DEMO.HDM = True  # seven subset queries (R, N, T, RN, RT, NT, RNT)
_C.MODEL.DEMO.ATM = True  # mixture of experts over the seven HDM features (needs HDM)
_C.MODEL.DEMO.HEAD = 4  # ATM chunks (DeMo RGBNT201: 4; RGBNT100/MSVR310: 8)
_C.MODEL.DEMO.DIRECT = True  # one head on the concatenated modality features (False: one per modality)
_C.MODEL.DEMO.HDM_DROPOUT = 0.1  # attention dropout of the HDM queries (DeMo's nn.MultiheadAttention)
_C.MODEL.DGAF = CN()
_C.MODEL.DGAF.ENABLED = False  # dual-gated fusion of the modality features instead of concatenation

_C.MODEL.SAP = CN()
_C.MODEL.SAP.LOGIT_SCALE_INIT = 25.0  # seed 000: close to the old sqrt(640) = 25.3
_C.MODEL.SAP.LOGIT_SCALE_MAX = 100.0  # seed 000: CLIP's ceiling
_C.MODEL.SAP.ENABLED = True  # False: ExpB1 without SAP (scaled cosine to the raw prototypes)
# learnable (seed 000) | fixed (old code: cosine logits / sqrt(phy_dim)) | constant (frozen at LOGIT_SCALE_INIT)
_C.MODEL.SAP.SCALE_MODE = "learnable"
# logit_scale_log in its own group with weight decay 0.0 (seed 000); False = ablation: decayed like the rest
_C.MODEL.SAP.SCALE_NO_DECAY = True
_C.MODEL.SAP.PURIFY_INIT = 0.5  # initial residual weight of the attended anchor, in (0, 1)
_C.MODEL.SAP.PROJECTIONS = True  # learn D x D query/key/value maps (identity init)
_C.MODEL.SAP.ANCHOR_MODE = "text"  # text (CLIP class names) | learned (per train class) | words (per name word) | prototype
# what "text" becomes without MODEL.CLIP_WEIGHTS: prototype | learned | error (the choice is logged)
_C.MODEL.SAP.ANCHOR_FALLBACK = "prototype"
_C.MODEL.SAP.ANCHOR_PROTO_WEIGHT = 0.5  # anchor = normalize((1 - w) * semantic + w * prototype)
_C.MODEL.SAP.PROMPT_TEMPLATE = "a photo of a {}."
_C.MODEL.SAP.CLIP_MODEL = "ViT-B-16"  # open_clip architecture of MODEL.CLIP_WEIGHTS, or a .json model config
_C.MODEL.SAP.LEARNED_DIM = 512  # width of learned class / word embeddings
_C.MODEL.SAP.WORD_VOCAB_SIZE = 1024  # words mode: most distinct words in the training class names
_C.MODEL.SAP.ANCHOR_CACHE_DIR = "outputs/cache/semantic_anchors"  # text embeddings, keyed by weights + template

_C.DATASETS = CN()
_C.DATASETS.NAMES = ""
_C.DATASETS.ROOT_DIR = "data"
# Keep samples whose NI/TI file is missing (zero image, False in the modality mask) instead of failing.
_C.DATASETS.ALLOW_MISSING_MODALITY = False
# Replace unreadable images by another of the same id/class and count them, instead of failing.
_C.DATASETS.SKIP_CORRUPT = False
# Open every image once while parsing (slow on big sets; catches corrupt files before training).
_C.DATASETS.VERIFY_IMAGES = False
# Generator settings of the synthetic sets (used only by synthetic_rgbnt): a preset ("" = small,
# "gpu", "ablation"; see datasets.synthetic.RGBNT_PRESETS) and the probability that a sample's
# NI or TI file is missing (< 0: the preset's, 0).
_C.DATASETS.SYNTHETIC = CN()
_C.DATASETS.SYNTHETIC.PRESET = ""
_C.DATASETS.SYNTHETIC.MISSING_MODALITY_PROB = -1.0

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = -1  # -1: CPUs available / local ranks, at most 8
_C.DATALOADER.NUM_INSTANCE = 8  # K of the P x K identity sampler
_C.DATALOADER.PREFETCH_FACTOR = 4

_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [256, 128]
_C.INPUT.SIZE_TEST = [256, 128]
_C.INPUT.PROB = 0.5  # horizontal flip
_C.INPUT.PADDING = 10
_C.INPUT.RE_PROB = 0.5  # random erasing
_C.INPUT.PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's
_C.INPUT.PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]

_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "SGD"  # SGD | Adam | AdamW
_C.SOLVER.BASE_LR = 0.05
# ReID: learning rate of the pretrained backbone (new modules use BASE_LR); <= 0 means BASE_LR.
_C.SOLVER.BACKBONE_LR = -1.0
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = True
_C.SOLVER.WEIGHT_DECAY = 5e-4
_C.SOLVER.MAX_EPOCHS = 50
_C.SOLVER.IMS_PER_BATCH = 64
_C.SOLVER.SCHEDULER = "cosine"  # cosine | step
_C.SOLVER.WARMUP_EPOCHS = 5
_C.SOLVER.WARMUP_FACTOR = 0.01  # lr at step 0 = BASE_LR * WARMUP_FACTOR, linear to BASE_LR
_C.SOLVER.STEPS = [30, 40]  # epochs at which the step scheduler multiplies by GAMMA
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.MIN_LR_FACTOR = 0.0  # cosine floor as a fraction of BASE_LR
_C.SOLVER.GRAD_CLIP = 5.0  # max global grad norm; <= 0 disables clipping
_C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs
_C.SOLVER.EVAL_PERIOD = 5  # epochs
_C.SOLVER.LOG_PERIOD = 20  # steps

_C.LOSS = CN()
_C.LOSS.ID_WEIGHT = 0.25  # DeMo
_C.LOSS.ID_LABEL_SMOOTHING = 0.1
_C.LOSS.TRIPLET_WEIGHT = 1.0
_C.LOSS.TRIPLET_MARGIN = 0.3  # used when TRIPLET_SOFT_MARGIN is False
_C.LOSS.TRIPLET_SOFT_MARGIN = True  # DeMo's soft-margin triplet

# Similarity distribution matching between modalities, missing modalities masked (seed 002).
_C.LOSS.SDM = CN()
_C.LOSS.SDM.ENABLED = True
_C.LOSS.SDM.WEIGHT = 1.0
_C.LOSS.SDM.INIT_TEMPERATURE = 0.20
_C.LOSS.SDM.FINAL_TEMPERATURE = 0.18
_C.LOSS.SDM.FALLBACK_TEMPERATURE = 0.25
_C.LOSS.SDM.ANNEAL_EPOCHS = 10.0  # epochs from INIT to FINAL temperature
_C.LOSS.SDM.FALLBACK_STEPS = 100  # steps at the fallback temperature after a non-finite SDM loss
_C.LOSS.SDM.MIN_TEMPERATURE = 0.15
_C.LOSS.SDM.MAX_TEMPERATURE = 0.5
# fixed (symmetric KL, seed 002) | legacy (the pre-fix ce - h formula; ablation only: can go negative)
_C.LOSS.SDM.FORMULA = "fixed"
# exclude missing modalities' placeholder features from SDM (seed 002 v2); False = ablation row
_C.LOSS.SDM.USE_MASKS = True

# Feature-norm band regulariser on the BN-neck features (seed 002; v2 raises WEIGHT to 1e-2).
_C.LOSS.FEAT_NORM = CN()
_C.LOSS.FEAT_NORM.ENABLED = True
_C.LOSS.FEAT_NORM.TARGET = 8.0
_C.LOSS.FEAT_NORM.BAND = 2.0
_C.LOSS.FEAT_NORM.WEIGHT = 5e-3

# Gated-attention conditional-entropy regulariser (seed 004).
_C.LOSS.CEM = CN()
_C.LOSS.CEM.ENABLED = False
_C.LOSS.CEM.ATTN_HIDDEN = 128
_C.LOSS.CEM.TAU = 0.1
_C.LOSS.CEM.MARGIN = 0.1
_C.LOSS.CEM.BETA = 1.0
_C.LOSS.CEM.SNR_THRESH = 0.3
_C.LOSS.CEM.SNR_SHARP = 10.0
_C.LOSS.CEM.CLASS_GATE_A = 10.0
_C.LOSS.CEM.CLASS_GATE_B = 0.05
_C.LOSS.CEM.SLOT_POWER = 2.0
_C.LOSS.CEM.LOSS_SCALE = 0.1
_C.LOSS.CEM.WARMUP_EPOCHS = 5.0
_C.LOSS.CEM.LR = 1e-3  # its own parameter group

# Few-shot episodes and stages (ExpB1). Keys are added by the few-shot code.
_C.FEWSHOT = CN()
# Stages run in order: pretrain (batch classification over the train classes) and/or meta (episodes).
_C.FEWSHOT.STAGES = ["pretrain", "meta"]
_C.FEWSHOT.NUM_TRAIN_CLASSES = 64  # pre-training head size / learned anchors (miniImageNet: 64)
_C.FEWSHOT.IMAGE_SIZE = 84
_C.FEWSHOT.TRAIN_SPLIT = "train"
_C.FEWSHOT.VAL_SPLIT = "val"
_C.FEWSHOT.TEST_SPLIT = "test"
# training episodes (meta stage); SOLVER.MAX_EPOCHS epochs of EPISODES_PER_EPOCH episodes
_C.FEWSHOT.N_WAY = 5
_C.FEWSHOT.K_SHOT = 1
_C.FEWSHOT.N_QUERY = 15
_C.FEWSHOT.EPISODES_PER_EPOCH = 100
# scaled-cosine classifier of the episode: logits = METRIC_SCALE * cos(query, prototype)
_C.FEWSHOT.METRIC_SCALE = 10.0
_C.FEWSHOT.METRIC_SCALE_LEARNABLE = False
# evaluation: fixed-seed episodes, mean accuracy and 95% CI = CI_Z * std / sqrt(n)
_C.FEWSHOT.TEST_WAY = 5
_C.FEWSHOT.TEST_SHOTS = [1, 5]
_C.FEWSHOT.TEST_QUERY = 15
_C.FEWSHOT.TEST_EPISODES = 2000
_C.FEWSHOT.VAL_EPISODES = 200  # validation every SOLVER.EVAL_PERIOD epochs, K_SHOT shots
_C.FEWSHOT.EVAL_SEED = 1  # test/val episodes are drawn from this seed, identical across runs
_C.FEWSHOT.CI_Z = 1.96
_C.FEWSHOT.TEST_CHECKPOINT = "last"  # last | best (the best validation checkpoint of the last stage)
_C.FEWSHOT.PLOT = True  # PNG of the SAP stats over training (and to W&B)

_C.FEWSHOT.PRETRAIN = CN()  # pre-training stage; optimizer settings otherwise from SOLVER
_C.FEWSHOT.PRETRAIN.EPOCHS = 0
_C.FEWSHOT.PRETRAIN.BASE_LR = 0.1
_C.FEWSHOT.PRETRAIN.BATCH_SIZE = 128
_C.FEWSHOT.PRETRAIN.WARMUP_EPOCHS = 1

_C.FEWSHOT.BACKBONE = CN()  # arguments of MODEL.BACKBONE (resnet12 | tiny_conv | timm)
_C.FEWSHOT.BACKBONE.CHANNELS = [64, 160, 320, 640]  # stage widths; the last is SAP's phy_dim
_C.FEWSHOT.BACKBONE.DROP_RATE = 0.1  # dropout (stages 1-2) / DropBlock (stages 3-4)
_C.FEWSHOT.BACKBONE.DROPBLOCK_SIZE = 5
_C.FEWSHOT.BACKBONE.DROPBLOCK_RAMP_STEPS = 40000  # FEAT: 20 * 2000 forward calls
_C.FEWSHOT.BACKBONE.TIMM_NAME = ""  # MODEL.BACKBONE timm: any timm model name
_C.FEWSHOT.BACKBONE.WEIGHTS = ""  # local backbone weights file ("" = random init)

# Training monitors: loss-spike detector and non-finite guard (seed 002).
_C.MONITOR = CN()
_C.MONITOR.SPIKE_WINDOW = 100
_C.MONITOR.SPIKE_WARMUP = 20
_C.MONITOR.SPIKE_MAD_FLOOR = 0.05
_C.MONITOR.SPIKE_REL_FLOOR = 0.15
_C.MONITOR.SPIKE_SIGMAS = 6.0
# Non-finite loss/gradient steps are skipped; this many in a row stop the run (last good checkpoint kept).
_C.MONITOR.MAX_NONFINITE_STEPS = 5

_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 128
_C.TEST.FEAT_NORM = True  # L2-normalise retrieval features before distances
_C.TEST.METRIC = "euclidean"  # euclidean | cosine
_C.TEST.RE_RANKING = False
_C.TEST.MAX_RANK = 50
# Missing-modality test setting, DeMo's meaning: the letters name the modalities MISSING at test time
# (r = RGB, n = NI, t = TI: "r", "n", "t", "rn", "rt", "nt"); "nothing" (or "") = all present.
_C.TEST.MISS = "nothing"
# What a missing test modality becomes: "mask" (null token, excluded from fusion) or "zero" (DeMo's zero image).
_C.TEST.MISS_MODE = "mask"
_C.TEST.VIS_QUERIES = 4  # queries drawn in the top-10 retrieval figure

_C.WANDB = CN()
# auto = online when a W&B login is found, else offline | online | offline | disabled
_C.WANDB.MODE = "auto"
_C.WANDB.PROJECT = "demo-sdtps-expb1"
_C.WANDB.ENTITY = ""
_C.WANDB.NAME = ""
_C.WANDB.GROUP = ""
_C.WANDB.TAGS = []
_C.WANDB.INIT_TIMEOUT = 60.0  # seconds before an unreachable server makes the run fall back to offline


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def load_config(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    freeze: bool = True,
) -> CN:
    """Defaults, then the YAML file (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides.

    Raises ``FileNotFoundError`` for a missing file and ``ConfigError`` for an
    unknown key, a wrong type, or an odd-length override list.
    """
    cfg = get_default_config()
    if config_file:
        for path, data in _yaml_chain(Path(config_file), seen=()):
            merge_dict(cfg, data, source=str(path))
    merge_overrides(cfg, overrides)
    validate(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _choices() -> dict[str, tuple[str, ...]]:
    """Keys whose value is one of a few names, with those names (owned by the code that reads them)."""
    from engine.logger import WANDB_MODES
    from modeling.clip_checkpoint import CLIP_ACTIVATIONS
    from modeling.module.semantic_anchor_purification import SCALE_MODES
    from modeling.module.semantic_anchors import ANCHOR_FALLBACKS, ANCHOR_MODES

    return {
        "TEST.MISS_MODE": ("mask", "zero"),
        "TEST.METRIC": ("euclidean", "cosine"),
        "MODEL.CLIP_ACTIVATION": CLIP_ACTIVATIONS,
        "MODEL.SIE_TOKENS": ("cls", "all"),
        "MODEL.SAP.SCALE_MODE": SCALE_MODES,
        "MODEL.SAP.ANCHOR_MODE": ANCHOR_MODES,
        "MODEL.SAP.ANCHOR_FALLBACK": ANCHOR_FALLBACKS,
        "SOLVER.SCHEDULER": ("cosine", "step"),
        "LOSS.SDM.FORMULA": ("fixed", "legacy"),
        "FEWSHOT.TEST_CHECKPOINT": ("last", "best"),
        "WANDB.MODE": WANDB_MODES,
    }


def validate(cfg: CN) -> None:
    """Refuse, before anything runs, values that can only be wrong: an unknown name for a key
    that takes one of a few names, and a ``TEST.MISS`` that is not a missing-modality setting."""
    from engine.missing import missing_modalities

    for key, allowed in _choices().items():
        value = _get(cfg, key)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'{extra}")
    try:
        missing_modalities(cfg.TEST.MISS)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def config_to_dict(cfg: CN) -> dict[str, Any]:
    """The config as plain nested dicts (for W&B and JSON)."""
    return {k: config_to_dict(v) if isinstance(v, CN) else v for k, v in cfg.items()}


def _get(cfg: CN, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def merge_overrides(cfg: CN, overrides: Sequence[str], source: str = "command line") -> None:
    """Apply ``["SOLVER.BASE_LR", "1e-4", ...]`` pairs; values are parsed as Python literals."""
    if len(overrides) % 2:
        raise ConfigError(
            f"{source}: overrides must be KEY VALUE pairs, got an odd number ({len(overrides)}): {list(overrides)}"
        )
    for key, raw in zip(overrides[0::2], overrides[1::2], strict=True):
        node: dict[str, Any] = {}
        cursor = node
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _parse_literal(raw)
        merge_dict(cfg, node, source=source)


def merge_dict(cfg: CN, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Merge a plain nested dict into ``cfg`` with key and type checks naming ``source``."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in cfg:
            if full in MOVED_KEYS:
                raise ConfigError(f"{source}: config key '{full}' has moved: use {MOVED_KEYS[full]}")
            if full in DEMO_KEYS:
                place = DEMO_KEYS[full]
                where = f"has {place}" if place.startswith("no key") else f"is {place} here"
                raise ConfigError(f"{source}: DeMo's config key '{full}' {where}")
            hint = difflib.get_close_matches(key, list(cfg.keys()), n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown config key '{full}'{extra}")
        default = cfg[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{full}' is a section; got {type(value).__name__} {value!r}")
            merge_dict(default, value, source, prefix=f"{full}.")
        else:
            cfg[key] = _coerce(value, default, full, source)


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise ``ConfigError``."""

    def fail() -> ConfigError:
        return ConfigError(
            f"{source}: config key '{key}' expects {type(default).__name__} "
            f"(default {default!r}), got {type(value).__name__} {value!r}"
        )

    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:  # DeMo's 'yes' / 'no', 'on' / 'off'
            return _BOOL_WORDS[value.lower()]
        raise fail()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        raise fail()
    raise fail()


_BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _yaml_chain(path: Path, seen: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Return ``[(file, dict), ...]`` for ``path`` and its bases, base first."""
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    chain: list[tuple[Path, dict[str, Any]]] = []
    bases = data.pop(BASE_KEY, None)
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else bases:
            chain += _yaml_chain(path.parent / base, seen=(*seen, resolved))
    chain.append((path, data))
    return chain
