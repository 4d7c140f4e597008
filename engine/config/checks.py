"""What a loaded config must satisfy, checked before any data, model or folder exists: the names a key may
take, the range of every number (:data:`RANGES`, plus each family's own), keys that must agree, and the
families' own checks (``Family.check``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from yacs.config import CfgNode as CN

from engine.config.errors import ConfigError
from engine.family import Family, families_of_config

#: ``MODEL.COMPILE`` names: "" (eager) or a mode of ``torch.compile`` (engine/trainer.compile_model).
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


COUNT = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)  # a probability, a weight or a fraction of a rate
DROP = Range(0, 1, high_open=True)  # a dropout rate
SIZE = Range(1, integers=True, min_items=2, max_items=2, note="height, width in pixels")

#: Numeric keys and the values they accept, checked when a config loads (a key the config lacks is skipped).
#: A numeric key without an entry takes any value of its type: a seed; a key whose sign switches it
#: (SOLVER.GRAD_CLIP <= 0: no clipping, SOLVER.BACKBONE_LR <= 0: BASE_LR); or a setting of either sign. Each family
#: adds the ranges of its own keys (``Family.ranges``); a family alone may narrow a shared key's range.
RANGES: dict[str, Range] = {
    "MODEL.NUM_CLASSES": Range(0, note="0: set from the data set"),
    "DATALOADER.NUM_WORKERS": Range(-1, note="-1: one per CPU"),
    "DEVICE.CPU_THREADS": Range(0, note="0: torch's default"),
    "DATALOADER.PREFETCH_FACTOR": COUNT,
    "SOLVER.BASE_LR": NON_NEGATIVE,
    "SOLVER.MOMENTUM": UNIT,
    "SOLVER.WEIGHT_DECAY": NON_NEGATIVE,
    "SOLVER.MAX_EPOCHS": COUNT,
    "SOLVER.IMS_PER_BATCH": COUNT,
    "SOLVER.WARMUP_EPOCHS": NON_NEGATIVE,
    "SOLVER.WARMUP_FACTOR": UNIT,
    "SOLVER.STEPS": Range(0, integers=True, note="epochs"),
    "SOLVER.GAMMA": Range(0, 1, low_open=True),
    "SOLVER.MIN_LR_FACTOR": UNIT,
    "SOLVER.LR_NOISE": Range(0, 1, high_open=True, note="0: off"),
    "SOLVER.LR_NOISE_STD": POSITIVE,
    "SOLVER.CHECKPOINT_PERIOD": COUNT,
    "SOLVER.EVAL_PERIOD": COUNT,
    "SOLVER.LOG_PERIOD": COUNT,
    "MONITOR.SPIKE_WINDOW": COUNT,
    "MONITOR.SPIKE_WARMUP": COUNT,
    "MONITOR.SPIKE_MAD_FLOOR": NON_NEGATIVE,
    "MONITOR.SPIKE_REL_FLOOR": NON_NEGATIVE,
    "MONITOR.SPIKE_SIGMAS": POSITIVE,
    "MONITOR.MAX_NONFINITE_STEPS": COUNT,
    "MONITOR.BLOWUP_FACTOR": Range(0, note="0: off"),
    "MONITOR.PROFILE_EPOCH": Range(0, note="0: off"),
    "MONITOR.PROFILE_STEPS": COUNT,
    "TEST.IMS_PER_BATCH": COUNT,
    "WANDB.INIT_TIMEOUT": POSITIVE,
}

#: ``(key, other, slack)``: the value of ``key`` must be at most that of ``other`` plus ``slack`` (keys the
#: config lacks are skipped).
ORDERED_KEYS: tuple[tuple[str, str, int], ...] = (
    ("LOSS.SDM.MIN_TEMPERATURE", "LOSS.SDM.MAX_TEMPERATURE", 0),
    ("MONITOR.SPIKE_WARMUP", "MONITOR.SPIKE_WINDOW", 0),
    ("MODEL.SAP.LOGIT_SCALE_INIT", "MODEL.SAP.LOGIT_SCALE_MAX", 0),
    ("TEST.RE_RANKING_K2", "TEST.RE_RANKING_K1", 1),
)


def validate(cfg: CN) -> None:
    """Refuse, before any data, model or folder exists, values that can only be wrong: an unknown name for a key
    that takes one of a few names, a number outside its key's range, keys that contradict each other, then the
    checks of the config's family (e.g. image sizes against the ViT's patch grid)."""
    owners = families_of_config(cfg)
    _check_choices(cfg, choices(cfg, owners))
    _check_ranges(cfg, owners)
    for key, other, slack in ORDERED_KEYS:
        try:
            value, limit = get_key(cfg, key), get_key(cfg, other)
        except KeyError:
            continue
        if value > limit + slack:
            bound = f"{other} + {slack} ({limit + slack:g})" if slack else f"{other} ({limit:g})"
            raise ConfigError(f"config key '{key}' must be <= {bound}; got {value!r}")
    from engine.device import resolve_device

    resolve_device(cfg.DEVICE.NAME)  # a name it does not know, or CUDA without a GPU
    _check_combinations(cfg)
    for family in owners:
        family.check(cfg)


def choices(cfg: CN, owners: tuple[Family, ...]) -> dict[str, tuple[str, ...]]:
    """Keys whose value is one of a few names, with those names (owned by the code that reads them); a key that
    several families name (``MODEL.BACKBONE``) takes the names of each. ``DATASETS.NAMES`` takes the data sets of
    ``owners``."""
    from engine.device import _DTYPES
    from engine.logger import WANDB_MODES
    from engine.seed import DETERMINISTIC_ATTENTION
    from engine.solver import EPOCH_SCHEDULES, OPTIMIZERS, STEP_SCHEDULES
    from modeling.clip_checkpoint import CLIP_ACTIVATIONS

    named: dict[str, tuple[str, ...]] = {
        "DEVICE.PRECISION": ("auto", *_DTYPES),
        "SOLVER.OPTIMIZER": OPTIMIZERS,
        "MODEL.COMPILE": COMPILE_MODES,
        "DETERMINISTIC_ATTENTION": DETERMINISTIC_ATTENTION,
        "MODEL.BACKBONE": ("",),
        "DATASETS.NAMES": ("", *(name for family in owners for name in family.datasets)),
        "MODEL.CLIP_ACTIVATION": CLIP_ACTIVATIONS,
        "SOLVER.SCHEDULER": (*STEP_SCHEDULES, *EPOCH_SCHEDULES),
        "MODEL.COMPILE_SCOPE": ("model", "step"),
        "WANDB.MODE": WANDB_MODES,
    }
    for family in owners:
        for key, allowed in family.choices(cfg).items():
            named[key] = (*named.get(key, ()), *allowed)
    return named


def _check_choices(cfg: CN, named: dict[str, tuple[str, ...]]) -> None:
    for key, allowed in named.items():
        try:
            value = get_key(cfg, key)
        except KeyError:  # a key this config does not have
            continue
        if value not in allowed:
            same_case = [a for a in allowed if a.lower() == str(value).lower()]
            hint = same_case or difflib.get_close_matches(str(value), allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            names = ", ".join(a or "''" for a in allowed)
            raise ConfigError(f"config key '{key}' must be one of {names}; got '{value}'{extra}")


def _check_ranges(cfg: CN, owners: tuple[Family, ...]) -> None:
    ranges = dict(RANGES)
    for family in owners:  # a family's own range of a shared key holds for a config of that family alone
        ranges.update({k: r for k, r in family.ranges.items() if k not in RANGES or len(owners) == 1})
    for key, rule in ranges.items():
        try:
            value = get_key(cfg, key)
        except KeyError:
            continue
        if not rule.admits(value):
            raise ConfigError(f"config key '{key}' must be {rule.describe(isinstance(value, list))}; got {value!r}")


def _check_combinations(cfg: CN) -> None:
    """Shared settings that are each fine but cannot be used together."""
    s = cfg.SOLVER
    if s.LR_NOISE > 0 and s.SCHEDULER != "timm_cosine":
        raise ConfigError(f"SOLVER.LR_NOISE is a setting of SOLVER.SCHEDULER timm_cosine, not of '{s.SCHEDULER}'")
    if s.OPTIMIZER == "SGD" and s.NESTEROV and s.MOMENTUM == 0:
        raise ConfigError(f"SOLVER.NESTEROV True needs SOLVER.MOMENTUM > 0 with SOLVER.OPTIMIZER SGD; got "
                          f"SOLVER.MOMENTUM {s.MOMENTUM!r} (give SOLVER.NESTEROV False for plain SGD)")


def get_key(cfg: CN, key: str) -> Any:
    """The value of the dotted ``key`` in ``cfg``; ``KeyError`` when a part is missing."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node
