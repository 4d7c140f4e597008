"""The configuration (yacs): the shared schema, loading with ``_BASE_`` chains and overrides, and the checks.

A family adds its own keys (``engine/<family>/config.py``) through its registration (:mod:`engine.family`).
"""

from engine.config.checks import COMPILE_MODES, ORDERED_KEYS, RANGES, Range, get_key, validate
from engine.config.errors import ConfigError
from engine.config.load import (
    MOVED_KEYS,
    config_to_dict,
    family_of,
    flatten,
    load_config,
    merge_dict,
    merge_overrides,
)
from engine.config.schema import base_config, get_default_config

__all__ = [
    "COMPILE_MODES", "ConfigError", "MOVED_KEYS", "ORDERED_KEYS", "RANGES", "Range", "base_config",
    "config_to_dict", "family_of", "flatten", "get_default_config", "get_key", "load_config", "merge_dict",
    "merge_overrides", "validate",
]
