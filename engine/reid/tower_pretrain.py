"""Synthetic pretraining of the CLIP image tower: the stand-in for CLIP weights on the synthetic sets.

The questions the ablations ask are about a CLIP-initialised tower. Without CLIP weights, a
tower pretrained here plays that part: a DeMo-SDTPS model is trained by the ReID trainer on a
synthetic set whose identities are never in the ablation sets (another generator seed; ID,
triplet and centred SDM between the modalities), and its tower (``backbone.visual.*``) is kept.

``tools/pretrain_tower.py --config_file RECIPE --out FILE`` runs a recipe (e.g.
``configs/synthetic/Pretrain_tower_small.yml``) into ``<FILE's folder>/run/`` and exports the
tower's ``visual.*`` tensors to ``FILE`` with an ``open_clip_config.json`` beside it (so the
activation is read from the file, as for open_clip weights) and ``pretrain.json`` (the recipe's
config and its test metrics). A ReID config that names the recipe in ``MODEL.PRETRAIN_RECIPE``
gets ``MODEL.PRETRAIN_PATH`` made on first use (:func:`ensure_pretrained_tower`) and reused
after; a tower made with another recipe is refused, not silently used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.checkpoint import Checkpointer, read_checkpoint
from engine.config import ConfigError, load_config
from engine.recipes import RUN_DIR, ensure_made, recipe_record, record_beside, train_recipe
from engine.reid.checks import BACKBONE_ARCHS
from modeling.backbones.clip_vit import CLIP_VIT_CONFIGS
from modeling.clip_checkpoint import OPEN_CLIP_CONFIG
from utils.io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

RECORD = "pretrain.json"
def export_tower(cfg: CN, run_dir: Path, out: Path, results: dict[str, Any] | None = None) -> Path:
    """Write the tower of ``run_dir``'s newest checkpoint to ``out`` (``visual.*`` tensors), its
    ``open_clip_config.json`` and :data:`RECORD` beside it; the tensor file is written last."""
    checkpoint = Checkpointer(run_dir).latest()
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoint to export the tower from")
    state = read_checkpoint(checkpoint, run_dir)["model"]
    prefix = "backbone.visual."
    tower = {"visual." + k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}
    if not tower:
        raise ConfigError(f"{checkpoint} holds no CLIP tower tensors ('{prefix}*'): not a DeMo / DeMo_SDTPS checkpoint")
    arch = BACKBONE_ARCHS.get(cfg.MODEL.BACKBONE)
    if arch is None:
        raise ConfigError(f"MODEL.BACKBONE '{cfg.MODEL.BACKBONE}' is not a CLIP tower ({sorted(BACKBONE_ARCHS)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    quick_gelu = cfg.MODEL.CLIP_ACTIVATION != "gelu"
    atomic_write_json(out.parent / OPEN_CLIP_CONFIG, {"model_cfg": {**CLIP_VIT_CONFIGS[arch], "quick_gelu": quick_gelu}})
    atomic_write_json(out.parent / RECORD, {"recipe": recipe_record(cfg), "checkpoint": str(checkpoint),
                                            "results": results or {}})
    atomic_write(out, lambda f: torch.save(tower, f))
    logger.info("exported %d tower tensors of %s to %s", len(tower), checkpoint, out)
    return out


def read_record(out: Path) -> dict[str, Any] | None:
    """The :data:`RECORD` beside a tower file, or ``None`` when either is absent or unreadable."""
    return record_beside(out, RECORD)


def ensure_pretrained_tower(cfg: CN) -> None:
    """Make ``MODEL.PRETRAIN_PATH`` with the recipe ``MODEL.PRETRAIN_RECIPE`` unless it is there already
    (:func:`engine.recipes.ensure_made`: :func:`pretrain_tower` in a process of its own, once, under a lock; a
    tower made with another recipe is refused)."""
    recipe = cfg.MODEL.PRETRAIN_RECIPE
    if not recipe:
        return
    if not cfg.MODEL.PRETRAIN_PATH:
        raise ConfigError("MODEL.PRETRAIN_RECIPE needs MODEL.PRETRAIN_PATH: the file the pretrained tower is written to")
    out = Path(cfg.MODEL.PRETRAIN_PATH)
    record = ensure_made(out, recipe, pretrain_tower, read_record, "CLIP tower", "MODEL.PRETRAIN_PATH")
    mAP = record.get("results", {}).get("mAP")
    logger.info("pretrained tower %s (recipe %s; its test mAP %s)", out, recipe,
                "n/a" if mAP is None else f"{100 * mAP:.2f}%")


def pretrain_tower(recipe: str, out: str | Path, overrides: Sequence[str] = (), resume: str | None = None) -> dict[
        str, Any]:
    """Train the ReID recipe ``recipe`` (a config file, with ``overrides``) into ``<out's folder>/run/`` (resumed
    if interrupted, skipped if finished), then export its tower to ``out``; returns the pretraining's test metrics.

    The training sets up this process as ``train_net.py`` does (log file, seed, run-folder lock): call it from a
    process of its own (the CLI ``tools/pretrain_tower.py``, or :func:`ensure_pretrained_tower`).
    """
    from engine.defaults import FINISHED_MARKER
    from engine.reid.run import run_reid

    out = Path(out)
    run_dir = out.parent / RUN_DIR
    opts = [*overrides, "OUTPUT_DIR", str(run_dir)]
    if load_config(recipe, opts).MODEL.PRETRAIN_RECIPE:
        raise ConfigError(f"{recipe} names a MODEL.PRETRAIN_RECIPE itself: a recipe trains from MODEL.PRETRAIN_PATH "
                          "or random init, it does not chain another pretraining")
    cfg = train_recipe(recipe, run_dir, opts, run_reid, resume)
    summary = json.loads((run_dir / FINISHED_MARKER).read_text())
    results = {k: summary[k] for k in ("mAP", "rank1", "mINP") if k in summary}
    export_tower(cfg, run_dir, out, results)
    return results
