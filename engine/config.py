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
# Weights to evaluate with --eval-only when no --resume checkpoint is given.
_C.MODEL.WEIGHTS = ""

_C.MODEL.SDTPS = CN()
_C.MODEL.SDTPS.ENABLED = True
_C.MODEL.SDTPS.NUM_HEADS = 4
_C.MODEL.SDTPS.KEEP_RATIO = 0.5
_C.MODEL.SDTPS.GATE_INIT_SCALE = 0.5  # seed 001: new init (old: 1.0)
_C.MODEL.SDTPS.GATE_INIT_BIAS = 0.5  # seed 001: new init (old: 0.0)
_C.MODEL.SDTPS.USE_GATE_NORM = False
_C.MODEL.SDTPS.RENORMALIZE_ATTN = False

_C.MODEL.SAP = CN()
_C.MODEL.SAP.LOGIT_SCALE_INIT = 25.0  # seed 000: close to the old sqrt(640) = 25.3
_C.MODEL.SAP.LOGIT_SCALE_MAX = 100.0  # seed 000: CLIP's ceiling

_C.DATASETS = CN()
_C.DATASETS.NAMES = ""
_C.DATASETS.ROOT_DIR = "data"

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4

_C.INPUT = CN()

_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "SGD"  # SGD | Adam | AdamW
_C.SOLVER.BASE_LR = 0.05
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

# Few-shot episodes and stages (ExpB1). Keys are added by the few-shot code.
_C.FEWSHOT = CN()

# Training monitors: loss-spike detector and non-finite guard (seed 002).
_C.MONITOR = CN()

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
    if freeze:
        cfg.freeze()
    return cfg


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
