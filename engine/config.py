"""The configuration schema (yacs): the shared base here, one function per model family, and the loader.

Why here and not in ``configs/``: the schema is code that the engine owns and
every tool imports, while ``configs/`` holds only data (YAML files, one folder
per dataset, plus ``sweeps/``). Keeping the schema out of ``configs/`` means
that folder never needs to be a Python package.

Loading order: the defaults of the run's model family (the ``MODEL.NAME`` the files or
overrides set: ReID keys for ``DeMo`` / ``DeMo_SDTPS``, few-shot keys for ``ExpB1``, both
when none is named) -> the ``_BASE_`` chain of the YAML file (base first, paths relative to
the file that names them) -> the file itself -> ``KEY VALUE`` overrides from the command
line. A run's ``config.yaml`` therefore holds only the keys that mean something for it. Every key must exist in the
schema and every value must have the default's type; errors name the key, the
expected type and where the bad value came from. Then :func:`validate` checks, before any data, model or
folder exists, every value with a fixed set of names or a range (:data:`RANGES`), and the keys that must
agree. The result is frozen.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode as CN

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names key and source."""


#: Keys this schema no longer has, with the key that holds their setting now; a file naming one gets this text.
MOVED_KEYS: dict[str, str] = {
    "MODEL.QUICK_GELU": "MODEL.CLIP_ACTIVATION (auto | quick_gelu | gelu; auto reads the activation from the "
                        "weights file and is right for OpenAI's ViT-B-16.pt)",
    "FEWSHOT.NUM_TRAIN_CLASSES": "MODEL.NUM_CLASSES",
    "FEWSHOT.METRIC_SCALE": "MODEL.METRIC_SCALE",
    "FEWSHOT.METRIC_SCALE_LEARNABLE": "MODEL.METRIC_SCALE_LEARNABLE",
    "FEWSHOT.BACKBONE": "MODEL.BACKBONE_ARGS (the same keys: CHANNELS, DROP_RATE, DROPBLOCK_SIZE, "
                        "DROPBLOCK_RAMP_STEPS, TIMM_NAME, WEIGHTS)",
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
    "TEST.NECK_FEAT": "no key: the test feature is taken before the BNNeck, which is what DeMo's code does "
                      "whatever TEST.NECK_FEAT says",
    "TEST.WEIGHT": "MODEL.WEIGHTS",
    "DATALOADER.SAMPLER": "no key: training samples P x K identities (DeMo's softmax_triplet)",
}


#: The family of each model name: which keys its runs have.
MODEL_FAMILIES = {"DeMo": "reid", "DeMo_SDTPS": "reid", "ExpB1": "fewshot"}


def get_default_config(family: str | None = None) -> CN:
    """A fresh, mutable config with every key of ``family`` (``reid`` | ``fewshot``) at its default;
    ``None``: the keys of both families (a tool that names no model)."""
    from engine.config_fewshot import add_fewshot_config
    from engine.config_reid import add_reid_config

    if family not in (None, "reid", "fewshot"):
        raise ValueError(f"unknown model family {family!r} (reid | fewshot)")
    cfg = base_config()
    if family in (None, "reid"):
        add_reid_config(cfg)
    if family in (None, "fewshot"):
        add_fewshot_config(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Schema: the keys every run has; each family adds its own (engine/config_reid.py,
# engine/config_fewshot.py). Every magic number of the design lives in a key with its value.
# ---------------------------------------------------------------------------
def base_config() -> CN:
    """The keys shared by both families: run folder, seed, device, model name, data, solver, monitors, W&B."""
    _C = CN()
    _C.OUTPUT_DIR = "outputs/default"
    _C.SEED = 0
    # Deterministic kernels (torch's deterministic algorithms, strict: an operation without a deterministic
    # implementation raises; cuDNN deterministic; SDPA's math kernel instead of the fused ones): a run repeats
    # bit for bit on the same machine, side by side with others and across a resume (BENCHMARKS.md).
    _C.DETERMINISTIC = False

    _C.DEVICE = CN()
    _C.DEVICE.NAME = "auto"  # auto | cpu | cuda
    # Autocast precision: auto (bf16 on CUDA with bf16 support, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    _C.DEVICE.PRECISION = "auto"

    _C.MODEL = CN()
    _C.MODEL.NAME = ""  # ExpB1 | DeMo | DeMo_SDTPS
    _C.MODEL.BACKBONE = ""
    # Training classes (ReID: identities): the classifier's size; 0 = set by the trainer from the dataset.
    _C.MODEL.NUM_CLASSES = 0
    # Activation the CLIP towers are built with: auto (read from the weights file: QuickGELU for OpenAI's
    # files, an open_clip_config.json's quick_gelu; QuickGELU at random init) | quick_gelu | gelu.
    _C.MODEL.CLIP_ACTIVATION = "auto"
    # A checkpoint of this repository (or one tools/convert_demo_checkpoint.py wrote): evaluated by --eval-only
    # when no --resume checkpoint is given; the starting weights of a training run (fine-tuning) otherwise.
    _C.MODEL.WEIGHTS = ""
    # torch.compile the training model: "" (eager) | default | max-autotune-no-cudagraphs | reduce-overhead
    _C.MODEL.COMPILE = ""
    # what MODEL.COMPILE compiles for training: "step" (the forward and the loss as one graph, where the
    # objective supports it: ReID without LOSS.CEM; others fall back to "model") | "model" (the model's forward;
    # the loss then runs eagerly, and its launches cost host time that the data loader's workers also need)
    _C.MODEL.COMPILE_SCOPE = "step"
    # where compiled kernels are kept between runs (engine/compile_cache.py); "" = torch's local cache only
    _C.MODEL.COMPILE_CACHE_DIR = "outputs/cache/compile"

    _C.DATASETS = CN()
    _C.DATASETS.NAMES = ""
    _C.DATASETS.ROOT_DIR = "data"
    # Replace unreadable images by another of the same id/class and count them, instead of failing.
    _C.DATASETS.SKIP_CORRUPT = False
    # Open every image once while parsing (slow on big sets; catches corrupt files before training).
    _C.DATASETS.VERIFY_IMAGES = False

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = -1  # -1: CPUs available / local ranks, at most 8
    _C.DATALOADER.PREFETCH_FACTOR = 4
    # copy the next batch to the GPU on a side stream while the current step runs (engine/prefetch.py)
    _C.DATALOADER.PREFETCH_TO_DEVICE = True

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
    # cosine | step: set after every optimizer step, each group from its own rate (engine/solver.WarmupScheduler);
    # timm_cosine: timm's CosineLRScheduler set at the start of each epoch, DeMo's schedule: warm-up from
    # WARMUP_FACTOR x BASE_LR and floor MIN_LR_FACTOR x BASE_LR, both the same absolute rate for every group, the
    # cosine counted from epoch 0 (engine/solver.EpochCosineScheduler)
    _C.SOLVER.SCHEDULER = "cosine"
    _C.SOLVER.WARMUP_EPOCHS = 5
    _C.SOLVER.WARMUP_FACTOR = 0.01  # lr at step 0 = BASE_LR * WARMUP_FACTOR, linear to BASE_LR
    _C.SOLVER.STEPS = [30, 40]  # epochs at which the step scheduler multiplies by GAMMA
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.MIN_LR_FACTOR = 0.0  # cosine floor as a fraction of BASE_LR
    # timm_cosine only: each epoch before MAX_EPOCHS has its rates multiplied by 1 + n, n ~ N(0, LR_NOISE_STD)
    # redrawn until |n| < LR_NOISE, from a generator seeded LR_NOISE_SEED + epoch (DeMo: 0.67, 1.0, 42); 0 = off
    _C.SOLVER.LR_NOISE = 0.0
    _C.SOLVER.LR_NOISE_STD = 1.0
    _C.SOLVER.LR_NOISE_SEED = 42
    _C.SOLVER.GRAD_CLIP = 5.0  # max global grad norm; <= 0 disables clipping
    _C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs
    _C.SOLVER.EVAL_PERIOD = 5  # epochs
    _C.SOLVER.LOG_PERIOD = 20  # steps
    # write checkpoints from a background thread: the state is copied to host memory, the step goes on
    _C.SOLVER.CHECKPOINT_ASYNC = True

    # Training monitors: the robust loss-spike detector and the non-finite step guard.
    _C.MONITOR = CN()
    _C.MONITOR.SPIKE_WINDOW = 100
    _C.MONITOR.SPIKE_WARMUP = 20
    _C.MONITOR.SPIKE_MAD_FLOOR = 0.05
    _C.MONITOR.SPIKE_REL_FLOOR = 0.15
    _C.MONITOR.SPIKE_SIGMAS = 6.0
    # Non-finite loss/gradient steps are skipped; this many in a row stop the run (last good checkpoint kept).
    _C.MONITOR.MAX_NONFINITE_STEPS = 5
    # > 0: a step whose loss lies more than this many spike bands (threshold - median) above the median is not
    # applied either (a blow-up: e.g. a learning rate far too large); counted with the non-finite steps.
    _C.MONITOR.BLOWUP_FACTOR = 0.0
    # True: the host judges each step (the non-finite guard, blow-ups, spikes) one step later, while the GPU runs
    # the next, and the fused optimizer applies or skips the step on the device by the same rule: the host never
    # waits for the GPU. Needs a fused optimizer and no fp16 loss scaling (else each step is waited for). False:
    # wait for every step. The applied updates are the same; a blow-up's band then lags by one step.
    _C.MONITOR.DEFER_CHECKS = True
    # > 0: record a torch.profiler trace of MONITOR.PROFILE_STEPS steps of each stage's epoch PROFILE_EPOCH (1-based,
    # after one warm-up step), host and GPU, into OUTPUT_DIR/profile/ (engine/profiling.py); 0: off.
    _C.MONITOR.PROFILE_EPOCH = 0
    _C.MONITOR.PROFILE_STEPS = 10

    _C.TEST = CN()
    _C.TEST.IMS_PER_BATCH = 128

    _C.WANDB = CN()
    # auto = online when a W&B login is found, else offline | online | offline | disabled
    _C.WANDB.MODE = "auto"
    _C.WANDB.PROJECT = "demo-sdtps-expb1"
    _C.WANDB.ENTITY = ""
    _C.WANDB.NAME = ""
    _C.WANDB.GROUP = ""
    _C.WANDB.TAGS = []
    _C.WANDB.INIT_TIMEOUT = 60.0  # seconds before an unreachable server makes the run fall back to offline
    return _C


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
    chain = _yaml_chain(Path(config_file), seen=()) if config_file else []
    cfg = get_default_config(family_of(chain, overrides))
    for path, data in chain:
        merge_dict(cfg, data, source=str(path))
    merge_overrides(cfg, overrides)
    validate(cfg)
    if freeze:
        cfg.freeze()
    return cfg


#: ``MODEL.COMPILE`` names: "" (eager) or a mode of ``torch.compile`` (engine/trainer.compile_model).
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: ``MODEL.BACKBONE`` names of the few-shot family (modeling/exp_b1_model.build_exp_b1); "" fails when the model
#: is built, so that a config that builds none (a tool, a test) may leave it out.
FEWSHOT_BACKBONES = ("resnet12", "tiny_conv", "timm")


def _choices(cfg: CN) -> dict[str, tuple[str, ...]]:
    """Keys whose value is one of a few names, with those names (owned by the code that reads them).
    ``MODEL.BACKBONE`` and ``DATASETS.NAMES`` take the names of the families whose keys ``cfg`` has."""
    from datasets import FEWSHOT_DATASETS, REID_DATASETS
    from engine.device import _DTYPES
    from engine.logger import WANDB_MODES
    from engine.solver import EPOCH_SCHEDULES, OPTIMIZERS, STEP_SCHEDULES
    from engine.tower_pretrain import BACKBONE_ARCHS
    from modeling.clip_checkpoint import CLIP_ACTIVATIONS
    from modeling.module.semantic_anchor_purification import SCALE_MODES
    from modeling.module.semantic_anchors import ANCHOR_FALLBACKS, ANCHOR_MODES

    backbones, data_sets = [""], [""]
    if "INPUT" in cfg:  # the ReID keys
        backbones += [name for name in BACKBONE_ARCHS if name]
        data_sets += REID_DATASETS
    if "FEWSHOT" in cfg:
        backbones += FEWSHOT_BACKBONES
        data_sets += FEWSHOT_DATASETS
    choices = {
        "DEVICE.PRECISION": ("auto", *_DTYPES),
        "SOLVER.OPTIMIZER": OPTIMIZERS,
        "MODEL.COMPILE": COMPILE_MODES,
        "MODEL.BACKBONE": tuple(backbones),
        "DATASETS.NAMES": tuple(data_sets),
        "TEST.MISS_MODE": ("mask", "zero"),
        "TEST.METRIC": ("euclidean", "cosine"),
        "INPUT.TEST_INTERPOLATION": ("bicubic", "bilinear"),
        "MODEL.CLIP_ACTIVATION": CLIP_ACTIVATIONS,
        "MODEL.SIE_TOKENS": ("cls", "all"),
        "MODEL.SAP.SCALE_MODE": SCALE_MODES,
        "MODEL.SAP.ANCHOR_MODE": ANCHOR_MODES,
        "MODEL.SAP.ANCHOR_FALLBACK": ANCHOR_FALLBACKS,
        "SOLVER.SCHEDULER": (*STEP_SCHEDULES, *EPOCH_SCHEDULES),
        "MODEL.COMPILE_SCOPE": ("model", "step"),
        "LOSS.SDM.FORMULA": ("fixed", "legacy"),
        "FEWSHOT.TEST_CHECKPOINT": ("last", "best"),
        "WANDB.MODE": WANDB_MODES,
    }
    if "SYNTHETIC" in cfg.DATASETS:
        from datasets.synthetic_generators import RGBNT_PRESETS

        choices["DATASETS.SYNTHETIC.PRESET"] = ("", *RGBNT_PRESETS)
    return choices


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: at least ``low`` and at most ``high`` (``None``: no bound; ``*_open``: the bound
    itself excluded). For a list key it is what each entry accepts, and the list holds ``min_items`` to
    ``max_items`` entries (integers where ``integers``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a special value means, or what the number counts
    integers: bool = False
    min_items: int = 0
    max_items: int | None = None

    def admits(self, value: Any) -> bool:
        """Whether ``value`` (a number, or a list of them for a list key) lies in the range."""
        if isinstance(value, (list, tuple)):
            n_ok = self.min_items <= len(value) and (self.max_items is None or len(value) <= self.max_items)
            return n_ok and all(self._admits_number(x) for x in value)
        return self._admits_number(value)

    def _admits_number(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:  # x != x: NaN
            return False
        if self.integers and not isinstance(x, int):
            return False
        below = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        above = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        return not (below or above)

    def describe(self, is_list: bool = False) -> str:
        """``>= 1``, ``in (0, 1]``, ``a list of 2 integers >= 1``, ... with the note in parentheses."""
        if self.high is None:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.low is None:
            bound = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            bound = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                     f"{')' if self.high_open else ']'}")
        if is_list:
            if self.max_items is not None and self.max_items == self.min_items:
                count = str(self.min_items)
            else:
                count = "one or more" if self.min_items == 1 else ""
            bound = " ".join(filter(None, ["a list of", count, "integers" if self.integers else "numbers", bound]))
        return f"{bound} ({self.note})" if self.note else bound


_COUNT = Range(1)
_NON_NEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
_UNIT = Range(0, 1)  # a probability, a weight or a fraction of a rate
_DROP = Range(0, 1, high_open=True)  # a dropout rate
_SIZE = Range(1, integers=True, min_items=2, max_items=2, note="height, width in pixels")

#: Numeric keys and the values they accept, checked when a config loads (a key of the other family is skipped).
#: A numeric key without an entry takes any value of its type: a seed; a key whose sign switches it
#: (SOLVER.GRAD_CLIP <= 0: no clipping, SOLVER.BACKBONE_LR <= 0: BASE_LR); or a setting of either sign
#: (MODEL.SIE_COE, INPUT.PIXEL_MEAN, LOSS.CEM.MARGIN; MODEL.SDTPS.GATE_INIT_* lie within their bound, see below).
RANGES: dict[str, Range] = {
    "MODEL.NUM_CLASSES": Range(0, note="0: set from the data set"),
    "DATALOADER.NUM_WORKERS": Range(-1, note="-1: one per CPU"),
    "DATALOADER.PREFETCH_FACTOR": _COUNT,
    "SOLVER.BASE_LR": _NON_NEGATIVE,
    "SOLVER.MOMENTUM": _UNIT,
    "SOLVER.WEIGHT_DECAY": _NON_NEGATIVE,
    "SOLVER.MAX_EPOCHS": _COUNT,
    "SOLVER.IMS_PER_BATCH": _COUNT,
    "SOLVER.WARMUP_EPOCHS": _NON_NEGATIVE,
    "SOLVER.WARMUP_FACTOR": _UNIT,
    "SOLVER.STEPS": Range(0, integers=True, note="epochs"),
    "SOLVER.GAMMA": Range(0, 1, low_open=True),
    "SOLVER.MIN_LR_FACTOR": _UNIT,
    "SOLVER.LR_NOISE": Range(0, 1, high_open=True, note="0: off"),
    "SOLVER.LR_NOISE_STD": _POSITIVE,
    "SOLVER.CHECKPOINT_PERIOD": _COUNT,
    "SOLVER.EVAL_PERIOD": _COUNT,
    "SOLVER.LOG_PERIOD": _COUNT,
    "MONITOR.SPIKE_WINDOW": _COUNT,
    "MONITOR.SPIKE_WARMUP": _COUNT,
    "MONITOR.SPIKE_MAD_FLOOR": _NON_NEGATIVE,
    "MONITOR.SPIKE_REL_FLOOR": _NON_NEGATIVE,
    "MONITOR.SPIKE_SIGMAS": _POSITIVE,
    "MONITOR.MAX_NONFINITE_STEPS": _COUNT,
    "MONITOR.BLOWUP_FACTOR": Range(0, note="0: off"),
    "MONITOR.PROFILE_EPOCH": Range(0, note="0: off"),
    "MONITOR.PROFILE_STEPS": _COUNT,
    "TEST.IMS_PER_BATCH": _COUNT,
    "WANDB.INIT_TIMEOUT": _POSITIVE,
    # ReID
    "MODEL.NUM_CAMERAS": Range(0, note="0: set from the data set"),
    "MODEL.DEMO.HEAD": _COUNT,
    "MODEL.DEMO.HDM_DROPOUT": _DROP,
    "MODEL.SDTPS.NUM_HEADS": _COUNT,
    "MODEL.SDTPS.KEEP_RATIO": Range(0, 1, low_open=True, note="the fraction of patch tokens kept"),
    "MODEL.SDTPS.GATE_PARAM_BOUND": _POSITIVE,
    "DATASETS.SYNTHETIC.MISSING_MODALITY_PROB": Range(high=1, note="< 0: the preset's"),
    "DATALOADER.NUM_INSTANCE": Range(1, note="K, the images of one identity in a P x K batch"),
    "SOLVER.BIAS_LR_FACTOR": _NON_NEGATIVE,
    "SOLVER.WEIGHT_DECAY_BIAS": _NON_NEGATIVE,
    "INPUT.SIZE_TRAIN": _SIZE,
    "INPUT.SIZE_TEST": _SIZE,
    "INPUT.PROB": _UNIT,
    "INPUT.PADDING": _NON_NEGATIVE,
    "INPUT.RE_PROB": _UNIT,
    "INPUT.PIXEL_STD": Range(0, low_open=True, min_items=1),
    "LOSS.ID_WEIGHT": _NON_NEGATIVE,
    "LOSS.ID_LABEL_SMOOTHING": Range(0, 1, high_open=True),
    "LOSS.TRIPLET_WEIGHT": _NON_NEGATIVE,
    "LOSS.TRIPLET_MARGIN": _NON_NEGATIVE,
    "LOSS.SDM.WEIGHT": _NON_NEGATIVE,
    "LOSS.SDM.INIT_TEMPERATURE": _POSITIVE,
    "LOSS.SDM.FINAL_TEMPERATURE": _POSITIVE,
    "LOSS.SDM.FALLBACK_TEMPERATURE": _POSITIVE,
    "LOSS.SDM.ANNEAL_EPOCHS": _NON_NEGATIVE,
    "LOSS.SDM.FALLBACK_STEPS": _NON_NEGATIVE,
    "LOSS.SDM.MIN_TEMPERATURE": _POSITIVE,
    "LOSS.SDM.MAX_TEMPERATURE": _POSITIVE,
    "LOSS.FEAT_NORM.TARGET": _POSITIVE,
    "LOSS.FEAT_NORM.BAND": _NON_NEGATIVE,
    "LOSS.FEAT_NORM.WEIGHT": _NON_NEGATIVE,
    "LOSS.CEM.ATTN_HIDDEN": _COUNT,
    "LOSS.CEM.TAU": _POSITIVE,
    "LOSS.CEM.BETA": _POSITIVE,
    "LOSS.CEM.SNR_THRESH": _NON_NEGATIVE,
    "LOSS.CEM.SNR_SHARP": _POSITIVE,
    "LOSS.CEM.CLASS_GATE_A": _POSITIVE,
    "LOSS.CEM.CLASS_GATE_B": _UNIT,
    "LOSS.CEM.SLOT_POWER": _NON_NEGATIVE,
    "LOSS.CEM.LOSS_SCALE": _NON_NEGATIVE,
    "LOSS.CEM.WARMUP_EPOCHS": _NON_NEGATIVE,
    "LOSS.CEM.LR": _NON_NEGATIVE,
    "TEST.RE_RANKING_K1": _COUNT,
    "TEST.RE_RANKING_K2": Range(1, note="1: no query expansion"),
    "TEST.RE_RANKING_LAMBDA": _UNIT,
    "TEST.MAX_RANK": _COUNT,
    "TEST.VIS_QUERIES": _NON_NEGATIVE,
    # few-shot
    "MODEL.BACKBONE_ARGS.CHANNELS": Range(1, integers=True, min_items=1, note="stage widths"),
    "MODEL.BACKBONE_ARGS.DROP_RATE": _DROP,
    "MODEL.BACKBONE_ARGS.DROPBLOCK_SIZE": _COUNT,
    "MODEL.BACKBONE_ARGS.DROPBLOCK_RAMP_STEPS": _NON_NEGATIVE,
    "MODEL.METRIC_SCALE": _POSITIVE,
    "MODEL.SAP.LOGIT_SCALE_INIT": _POSITIVE,
    "MODEL.SAP.LOGIT_SCALE_MAX": _POSITIVE,
    "MODEL.SAP.PURIFY_INIT": Range(0, 1, low_open=True, high_open=True),
    "MODEL.SAP.ANCHOR_PROTO_WEIGHT": _UNIT,
    "MODEL.SAP.LEARNED_DIM": _COUNT,
    "MODEL.SAP.WORD_VOCAB_SIZE": _COUNT,
    "FEWSHOT.IMAGE_SIZE": _COUNT,
    "FEWSHOT.N_WAY": Range(2, note="classes per training episode"),
    "FEWSHOT.K_SHOT": _COUNT,
    "FEWSHOT.N_QUERY": _COUNT,
    "FEWSHOT.EPISODES_PER_EPOCH": _COUNT,
    "FEWSHOT.TEST_WAY": Range(2, note="classes per test episode"),
    "FEWSHOT.TEST_SHOTS": Range(1, integers=True, min_items=1),
    "FEWSHOT.TEST_QUERY": _COUNT,
    "FEWSHOT.TEST_EPISODES": _COUNT,
    "FEWSHOT.VAL_EPISODES": _COUNT,
    "FEWSHOT.CI_Z": _POSITIVE,
    "FEWSHOT.PRETRAIN.EPOCHS": Range(0, note="0: no pre-training"),
    "FEWSHOT.PRETRAIN.BASE_LR": _NON_NEGATIVE,
    "FEWSHOT.PRETRAIN.BATCH_SIZE": _COUNT,
    "FEWSHOT.PRETRAIN.WARMUP_EPOCHS": _NON_NEGATIVE,
}

#: Keys whose range differs in a config of the few-shot family alone (its classifier is never sized by the data).
FEWSHOT_RANGES: dict[str, Range] = {"MODEL.NUM_CLASSES": Range(1, note="the training classes")}

#: ``(key, other, slack)``: the value of ``key`` must be at most that of ``other`` plus ``slack``.
ORDERED_KEYS: tuple[tuple[str, str, int], ...] = (
    ("LOSS.SDM.MIN_TEMPERATURE", "LOSS.SDM.MAX_TEMPERATURE", 0),
    ("MONITOR.SPIKE_WARMUP", "MONITOR.SPIKE_WINDOW", 0),
    ("MODEL.SAP.LOGIT_SCALE_INIT", "MODEL.SAP.LOGIT_SCALE_MAX", 0),
    ("TEST.RE_RANKING_K2", "TEST.RE_RANKING_K1", 1),
)


def validate(cfg: CN) -> None:
    """Refuse, before any data, model or folder exists, values that can only be wrong: an unknown name for a key
    that takes one of a few names, a number outside its key's range, keys that contradict each other, image
    sizes that do not fit the ViT's patch grid, and a ``TEST.MISS`` that is not a missing-modality setting."""
    from engine.missing import missing_modalities

    for key, allowed in _choices(cfg).items():
        try:
            value = _get(cfg, key)
        except KeyError:  # a key of the other family
            continue
        if value not in allowed:
            same_case = [a for a in allowed if a.lower() == str(value).lower()]
            hint = same_case or difflib.get_close_matches(str(value), allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            names = ", ".join(a or "''" for a in allowed)
            raise ConfigError(f"config key '{key}' must be one of {names}; got '{value}'{extra}")
    if "FEWSHOT" in cfg:
        _check_stages(cfg.FEWSHOT.STAGES)
    few_shot_only = "FEWSHOT" in cfg and "INPUT" not in cfg
    ranges = {**RANGES, **(FEWSHOT_RANGES if few_shot_only else {})}
    for key, rule in ranges.items():
        try:
            value = _get(cfg, key)
        except KeyError:
            continue
        if not rule.admits(value):
            raise ConfigError(f"config key '{key}' must be {rule.describe(isinstance(value, list))}; got {value!r}")
    for key, other, slack in ORDERED_KEYS:
        try:
            value, limit = _get(cfg, key), _get(cfg, other)
        except KeyError:
            continue
        if value > limit + slack:
            bound = f"{other} + {slack} ({limit + slack:g})" if slack else f"{other} ({limit:g})"
            raise ConfigError(f"config key '{key}' must be <= {bound}; got {value!r}")
    if "MISS" in cfg.TEST:
        try:
            missing_modalities(cfg.TEST.MISS)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    from engine.device import resolve_device  # engine.device imports ConfigError from here

    resolve_device(cfg.DEVICE.NAME)  # a name it does not know, or CUDA without a GPU
    _check_combinations(cfg)
    if "INPUT" in cfg:
        _check_vit_shapes(cfg)


def _check_stages(stages: Sequence[str]) -> None:
    """``FEWSHOT.STAGES``: stages the few-shot engine runs, each once, in its order."""
    from engine.fewshot import STAGES

    if any(st not in STAGES for st in stages) or list(stages) != sorted(set(stages), key=STAGES.index):
        raise ConfigError(f"config key 'FEWSHOT.STAGES' must list stages of {', '.join(STAGES)}, each once and in "
                          f"that order; got {list(stages)}")


def _check_combinations(cfg: CN) -> None:
    """Settings that are each fine but cannot be used together."""
    s = cfg.SOLVER
    if s.LR_NOISE > 0 and s.SCHEDULER != "timm_cosine":
        raise ConfigError(f"SOLVER.LR_NOISE is a setting of SOLVER.SCHEDULER timm_cosine, not of '{s.SCHEDULER}'")
    if s.OPTIMIZER == "SGD" and s.NESTEROV and s.MOMENTUM == 0:
        raise ConfigError(f"SOLVER.NESTEROV True needs SOLVER.MOMENTUM > 0 with SOLVER.OPTIMIZER SGD; got "
                          f"SOLVER.MOMENTUM {s.MOMENTUM!r} (give SOLVER.NESTEROV False for plain SGD)")
    if "REDEAL_LEFTOVERS" in cfg.DATALOADER and not cfg.DATALOADER.REDEAL_LEFTOVERS and s.SCHEDULER not in (
            "timm_cosine",):
        raise ConfigError(f"DATALOADER.REDEAL_LEFTOVERS False gives epochs of varying length, which a per-step "
                          f"schedule (SOLVER.SCHEDULER {s.SCHEDULER}) cannot count; use SOLVER.SCHEDULER timm_cosine")
    if "NUM_INSTANCE" in cfg.DATALOADER:  # ReID's P x K identity batches (K >= 1: checked with the ranges)
        batch, k = s.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
        if batch % k:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH ({batch}) must be a multiple of DATALOADER.NUM_INSTANCE ({k}): a batch is P "
                f"identities x K images; e.g. SOLVER.IMS_PER_BATCH {k * max(1, batch // k)}"
            )
    if "DEMO" in cfg.MODEL and cfg.MODEL.DEMO.ATM and not cfg.MODEL.DEMO.HDM:
        raise ConfigError("MODEL.DEMO.ATM needs MODEL.DEMO.HDM (the experts mix the seven HDM features); got "
                          "MODEL.DEMO.ATM True with MODEL.DEMO.HDM False")
    if "SDTPS" in cfg.MODEL:
        bound = cfg.MODEL.SDTPS.GATE_PARAM_BOUND
        for key in ("GATE_INIT_SCALE", "GATE_INIT_BIAS"):
            value = cfg.MODEL.SDTPS[key]
            if abs(value) > bound:
                raise ConfigError(f"config key 'MODEL.SDTPS.{key}' must lie in [-MODEL.SDTPS.GATE_PARAM_BOUND, "
                                  f"MODEL.SDTPS.GATE_PARAM_BOUND] ([-{bound:g}, {bound:g}]); got {value!r}")
    if "BACKBONE_ARGS" in cfg.MODEL and cfg.MODEL.BACKBONE == "resnet12" and len(cfg.MODEL.BACKBONE_ARGS.CHANNELS) != 4:
        raise ConfigError(f"config key 'MODEL.BACKBONE_ARGS.CHANNELS' must list 4 stage widths for MODEL.BACKBONE "
                          f"resnet12; got {list(cfg.MODEL.BACKBONE_ARGS.CHANNELS)}")


def _check_vit_shapes(cfg: CN) -> None:
    """For a CLIP tower this repository knows (engine/tower_pretrain.BACKBONE_ARCHS): each side of
    ``INPUT.SIZE_TRAIN`` / ``SIZE_TEST`` a multiple of its patch size, both sizes giving the one patch grid its
    positional embedding is built for, and the heads of ATM and SDTPS dividing its token width."""
    from engine.tower_pretrain import BACKBONE_ARCHS
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
        size = list(_get(cfg, key))
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
        value = _get(cfg, key)
        if width % value:
            raise ConfigError(f"config key '{key}' must divide the {width}-d tokens of {named}; got {value}")


def _family_owning(key: str) -> str | None:
    """``"ReID"`` / ``"few-shot"`` when ``key`` exists only in that family's schema."""
    for family, label in (("reid", "ReID"), ("fewshot", "few-shot")):
        try:
            _get(get_default_config(family), key)
        except KeyError:
            continue
        return label
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"SOLVER": {"BASE_LR": 1e-3}}`` -> ``{"SOLVER.BASE_LR": 1e-3}`` (nested mappings to dotted keys)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_dict(cfg: CN) -> dict[str, Any]:
    """The config as plain nested dicts (for W&B and JSON)."""
    return {k: config_to_dict(v) if isinstance(v, CN) else v for k, v in cfg.items()}


def _get(cfg: CN, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def family_of(chain: Sequence[tuple[Path, dict[str, Any]]], overrides: Sequence[str]) -> str | None:
    """The family of the ``MODEL.NAME`` the files (last wins) and overrides set; ``None`` when none is set."""
    name = ""
    for _, data in chain:
        model = data.get("MODEL")
        if isinstance(model, dict) and isinstance(model.get("NAME"), str):
            name = model["NAME"]
    for key, value in zip(overrides[0::2], overrides[1::2]):
        if key == "MODEL.NAME":
            name = str(value)
    return MODEL_FAMILIES.get(name)


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
            other = _family_owning(full)
            if other is not None:
                raise ConfigError(f"{source}: config key '{full}' belongs to {other} models, not to this "
                                  f"config's MODEL.NAME family")
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
