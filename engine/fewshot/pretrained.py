"""A pre-training shared by every run of one seed: ``FEWSHOT.PRETRAIN.RECIPE`` made once per seed, then reused.

The published few-shot recipes pre-train a backbone once and meta-train every variant from it (FEAT's
``--init_weights``). A config that names a recipe (a few-shot config of the ``pretrain`` stage alone) in
``FEWSHOT.PRETRAIN.RECIPE`` does not pre-train itself: it starts its stages from the network that recipe
trains with the run's ``SEED``, written to ``<FEWSHOT.PRETRAIN.CACHE_DIR>/seed<SEED>/weights.pth`` the first
time a run asks for it (:func:`engine.recipes.ensure_made`: a process of its own, under a lock, so runs
started side by side make it once) and read by every later run of that seed, whatever its SAP, anchors or
episode head. The rows of an ablation then differ only in what their meta stage does, and a paired difference
compares them from the same network. A file made with another recipe is refused, not silently used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from yacs.config import CfgNode as CN

from engine.checkpoint import Checkpointer, read_checkpoint, write_weights
from engine.config import ConfigError, get_key, load_config
from engine.recipes import RUN_DIR, ensure_made, recipe_record, record_beside, train_recipe
from utils.io import atomic_write_json

logger = logging.getLogger(__name__)

WEIGHTS = "weights.pth"
RECORD = "pretrain.json"
#: what the pre-training stage trains, hence what a run takes from the recipe's network
TRAINED_PREFIXES = ("backbone.", "classifier.")
#: keys on which a run and its recipe must agree: the same network on the same data
SHARED_KEYS = ("MODEL.NAME", "MODEL.BACKBONE", "MODEL.BACKBONE_ARGS.CHANNELS", "MODEL.BACKBONE_ARGS.TIMM_NAME",
               "MODEL.NUM_CLASSES", "DATASETS.NAMES", "DATASETS.SYNTHETIC.PRESET", "FEWSHOT.IMAGE_SIZE",
               "FEWSHOT.TRAIN_SPLIT")


def pretrained_file(cfg: CN) -> Path:
    """Where the recipe's network for this run's seed is written."""
    return Path(cfg.FEWSHOT.PRETRAIN.CACHE_DIR) / f"seed{int(cfg.SEED)}" / WEIGHTS


def recipe_overrides(cfg: CN) -> list[str]:
    """What a run passes to its recipe: its seed, and where its data are (not part of what the recipe trains)."""
    return ["SEED", str(int(cfg.SEED)), "DATASETS.ROOT_DIR", str(cfg.DATASETS.ROOT_DIR)]


def check_recipe(cfg: CN) -> CN:
    """The recipe's config as this run would make it; :class:`ConfigError` when it is not a pre-training alone,
    chains another recipe, or trains another network or data than this run's (:data:`SHARED_KEYS`)."""
    recipe = cfg.FEWSHOT.PRETRAIN.RECIPE
    if not Path(recipe).is_file():
        raise ConfigError(f"the recipe '{recipe}' of FEWSHOT.PRETRAIN.RECIPE does not exist")
    rcfg = load_config(recipe, recipe_overrides(cfg))
    if list(rcfg.FEWSHOT.STAGES) != ["pretrain"]:
        raise ConfigError(f"{recipe} (FEWSHOT.PRETRAIN.RECIPE) must train FEWSHOT.STAGES [pretrain] alone, got "
                          f"{list(rcfg.FEWSHOT.STAGES)}")
    if rcfg.FEWSHOT.PRETRAIN.RECIPE:
        raise ConfigError(f"{recipe} names a FEWSHOT.PRETRAIN.RECIPE itself: a recipe pre-trains from scratch, it "
                          "does not chain another")
    differ = [f"{k}: {get_key(cfg, k)!r} here, {get_key(rcfg, k)!r} in the recipe" for k in SHARED_KEYS
              if get_key(cfg, k) != get_key(rcfg, k)]
    if differ:
        raise ConfigError(f"this run starts from the network {recipe} trains, so it must use the same network and "
                          f"data; these keys differ: {'; '.join(differ)}")
    return rcfg


def make_pretrained(recipe: str, out: str | Path, overrides: Sequence[str] = (), resume: str | None = None) -> dict[
        str, Any]:
    """Train ``recipe`` (with ``overrides``) into ``<out's folder>/run/`` (resumed if interrupted, skipped if
    finished) and write what its pre-training trained (:data:`TRAINED_PREFIXES`) to ``out``, with
    :data:`RECORD` beside it (the recipe and its test accuracy); returns that accuracy. Sets this process up as
    a training script does: call it from a process of its own (:func:`ensure_pretrained`)."""
    from engine.defaults import FINISHED_MARKER
    from engine.fewshot.run import run

    out = Path(out)
    run_dir = out.parent / RUN_DIR
    cfg = train_recipe(recipe, run_dir, [*overrides, "OUTPUT_DIR", str(run_dir)], run, resume)
    checkpoint = Checkpointer(run_dir).latest()
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoint of the recipe {recipe}")
    state = read_checkpoint(checkpoint, run_dir)["model"]
    trained = {k: v for k, v in state.items() if k.startswith(TRAINED_PREFIXES)}
    summary = json.loads((run_dir / FINISHED_MARKER).read_text())
    results = {k: v for k, v in summary.items() if k.endswith("/acc") or k.endswith("/ci95")}
    atomic_write_json(out.parent / RECORD, {"recipe": recipe_record(cfg), "checkpoint": checkpoint.name,
                                            "results": results})
    write_weights(out, trained)  # last: the record is read only beside a weights file
    logger.info("pre-trained network of %s (seed %s) written to %s", recipe, cfg.SEED, out)
    return results


def read_record(out: Path) -> dict[str, Any] | None:
    """The :data:`RECORD` beside a weights file, or ``None`` when either is absent or unreadable."""
    return record_beside(out, RECORD)


def ensure_pretrained(cfg: CN) -> Path | None:
    """The file of this run's seed made by ``FEWSHOT.PRETRAIN.RECIPE`` (made first when absent), or ``None``
    when the config names no recipe."""
    recipe = cfg.FEWSHOT.PRETRAIN.RECIPE
    if not recipe:
        return None
    check_recipe(cfg)
    out = pretrained_file(cfg)
    record = ensure_made(out, recipe, make_pretrained, read_record, "pre-trained network", "FEWSHOT.PRETRAIN.RECIPE",
                         overrides=recipe_overrides(cfg))
    acc = record.get("results", {}).get("5way_1shot/acc")
    logger.info("starting from the pre-trained network %s (recipe %s, seed %s; its 5-way 1-shot test accuracy %s)",
                out, recipe, cfg.SEED, "n/a" if acc is None else f"{100 * acc:.2f} %")
    return out


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load the tensors of ``path`` into ``model``'s pre-trained modules (:data:`TRAINED_PREFIXES`), every one of
    them with its shape; the other modules (SAP, anchors, the episode head) keep their initialisation."""
    state = read_checkpoint(path)["model"]  # a clear error for a damaged file
    own = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise ConfigError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, shapes "
                          f"{shapes[:3]}): delete it to make it again with the recipe")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
