"""What a run trains, as text: its resolved config without the keys that only name the run.

Two runs whose texts are equal train the same thing, so a finished one can stand for the other
(:func:`engine.experiments.collect.finished_runs`, ``tools/ablate.py``). The config system and the training
scripts' argument parsers are imported when a config is resolved, not when this module is.
"""

from __future__ import annotations

from pathlib import Path

#: keys that name a run rather than say what it trains (left out when runs are compared)
RUN_NAMING_KEYS = ("OUTPUT_DIR", "WANDB")
#: the config a run writes into its folder
RUN_CONFIG = "config.yaml"


def trained_config(config_file: str | Path | None, overrides: list[str]) -> str | None:
    """The resolved config of ``config_file`` + ``overrides`` as YAML text, without :data:`RUN_NAMING_KEYS`;
    ``None`` when it cannot be read (a file that is gone, a key that no longer exists)."""
    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(config_file, overrides, freeze=False)
    except (ConfigError, FileNotFoundError, ValueError):
        return None
    for key in RUN_NAMING_KEYS:
        cfg.pop(key, None)
    return cfg.dump()


def folder_config(run_dir: Path) -> str | None:
    """:func:`trained_config` of the config a run wrote into ``run_dir``."""
    return trained_config(Path(run_dir) / RUN_CONFIG, [])


def command_config(command: list[str]) -> str | None:
    """:func:`trained_config` of a training command ``python SCRIPT --config_file F [flags] KEY VALUE ...``,
    its flags read by the parser of the family whose script ``SCRIPT`` is."""
    from engine.defaults import default_argument_parser, overrides_from_args
    from engine.family import families

    script = Path(command[1]).name
    family = next((f for f in families() if f.script == script), None)
    args, _ = default_argument_parser("", family=family).parse_known_args(command[2:])
    return trained_config(args.config_file or None, overrides_from_args(args))
