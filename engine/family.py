"""Model families register themselves here; the engine's core looks them up by model or dataset name.

A family (ReID, few-shot) is a package ``engine/<name>/`` whose ``family.py`` calls :func:`register_family`
with what the core needs to know about it: its model and dataset names, the config keys it adds, the
values it allows, its entry script and where its run lives. No module of the core names a family: the
registry finds the packages by looking for ``engine/*/family.py`` the first time it is asked, and a
registration imports no model, loader or data generator (those load when the family's run starts).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yacs.config import CfgNode as CN

#: the module of a family package that registers it
REGISTRATION_MODULE = "family"


@dataclass(frozen=True)
class Family:
    """What the core knows of one model family."""

    #: short name (``reid``, ``fewshot``) and how messages call it (``ReID``, ``few-shot``)
    name: str
    label: str
    #: the script users type for it (``train_net.py``), named in messages and resume commands
    script: str
    #: ``MODEL.NAME`` values it builds and ``DATASETS.NAMES`` values it reads
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    #: adds the family's keys to the base config (``cfg`` is mutable)
    add_config: Callable[[CN], None]
    #: ``"module:function"`` of the family's ``run(cfg, args) -> results`` (imported when a run starts)
    run: str
    #: ``cfg -> {key: allowed names}`` for the family's keys that take one of a few names
    choices: Callable[[CN], Mapping[str, tuple[str, ...]]] = field(default=lambda cfg: {})
    #: ``{key: rule}`` ranges of the family's keys (rules of :mod:`engine.config.checks`)
    ranges: Mapping[str, Any] = field(default_factory=dict)
    #: further checks of a loaded config (combinations, shapes); raise ``ConfigError``
    check: Callable[[CN], None] = field(default=lambda cfg: None)
    #: ``{key: message}`` for keys the family's users may type that it does not have (another program's names,
    #: keys that moved); the message says what to write instead
    key_hints: Mapping[str, str] = field(default_factory=dict)
    #: adds the family's own command-line flags to an argument parser; returns ``{flag: config key}``
    add_arguments: Callable[[Any], dict[str, str]] = field(default=lambda parser: {})

    def runner(self) -> Callable[..., Any]:
        """The family's ``run(cfg, args)``, imported now."""
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


_FAMILIES: dict[str, Family] = {}
_DISCOVERED = False


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (a second registration under its name replaces the first)."""
    _FAMILIES[family.name] = family
    return family


def _discover() -> None:
    """Import ``engine/<package>/family.py`` of every package of the engine that has one."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    root = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(root)]):
        if info.ispkg and (root / info.name / f"{REGISTRATION_MODULE}.py").is_file():
            importlib.import_module(f"engine.{info.name}.{REGISTRATION_MODULE}")


def families() -> tuple[Family, ...]:
    """Every registered family, in the order their packages were found."""
    _discover()
    return tuple(_FAMILIES.values())


def get_family(name: str) -> Family:
    """The family registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    _discover()
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


def family_of_model(model_name: str) -> Family | None:
    """The family that builds ``MODEL.NAME`` ``model_name`` (``None``: no family does)."""
    return next((f for f in families() if model_name in f.models), None)


def family_of_dataset(dataset_name: str) -> Family | None:
    """The family that reads ``DATASETS.NAMES`` ``dataset_name`` (``None``: no family does)."""
    return next((f for f in families() if dataset_name in f.datasets), None)


def families_of_config(cfg: CN) -> tuple[Family, ...]:
    """The families whose keys ``cfg`` has: the one of its ``MODEL.NAME`` (:func:`engine.config.load_config` adds
    only that family's keys), or every family for a config that names no model (a tool's)."""
    family = family_of_model(cfg.MODEL.NAME)
    return (family,) if family is not None else families()
