"""Loading a config: the defaults of the run's model family, then the YAML chain, then ``KEY VALUE`` overrides.

Loading order: the defaults of the run's model family (the ``MODEL.NAME`` the files or overrides set picks the
registered family, :mod:`engine.family`, whose keys are added; every family's when none is named) -> the
``_BASE_`` chain of the YAML file (base first, paths relative to the file that names them) -> the file itself
-> ``KEY VALUE`` overrides from the command line. A run's ``config.yaml`` therefore holds only the keys that
mean something for it. Every key must exist in the schema and every value must have the default's type;
errors name the key, the expected type and where the bad value came from. Then
:func:`engine.config.checks.validate` checks every value with a fixed set of names or a range, and the keys
that must agree. The result is frozen.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from engine.config.checks import get_key, validate
from engine.config.errors import ConfigError
from engine.config.schema import get_default_config
from engine.family import families, family_of_model

BASE_KEY = "_BASE_"


#: Shared keys this schema no longer has, with the key that holds their setting now; a file naming one gets this
#: text (a family's own: ``Family.key_hints``).
MOVED_KEYS: dict[str, str] = {
    "MODEL.QUICK_GELU": "MODEL.CLIP_ACTIVATION (auto | quick_gelu | gelu; auto reads the activation from the "
                        "weights file and is right for OpenAI's ViT-B-16.pt)",
}

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


def _family_owning(key: str) -> str | None:
    """The label of the family (``ReID``, ``few-shot``) whose schema alone has ``key``."""
    for family in families():
        try:
            get_key(get_default_config(family.name), key)
        except KeyError:
            continue
        return family.label
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
    family = family_of_model(name)
    return family.name if family is not None else None


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
            hint = next((f.key_hints[full] for f in families() if full in f.key_hints), None)
            if hint is not None:
                raise ConfigError(f"{source}: {hint}")
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
