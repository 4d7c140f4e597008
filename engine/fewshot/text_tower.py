"""The class-name tower of the few-shot family: CLIP's text tower stood in for on data sets with compositional
class names, made once from a recipe and frozen.

A recipe (``MODEL.SAP.TEXT_TOWER_RECIPE``, a few-shot config) trains an image backbone on the training classes
(its stages, usually ``pretrain`` alone) into ``<tower's folder>/run/``; then :func:`fit_name_tower` fits a
:class:`modeling.module.name_tower.NameTower` to the training classes' names against that backbone's image
features, contrastively as CLIP (each image against every training class name, a learned linear image
projection and a learned temperature), and :func:`make_text_tower` writes the tower to ``MODEL.SAP.TEXT_TOWER``
with the recipe and what was measured on the test classes, never seen by the tower:

* ``zero_shot``: nearest-name classification of each query among the episode's N class names (no support
  image), ``FEWSHOT.TEXT_TOWER.EPISODES`` fixed-seed N-way episodes (the test episodes of the 1-shot table);
* ``prototype_1shot``: the same episodes classified by the nearest 1-shot prototype of the same backbone.

A config that names the recipe gets the tower made on first use (:func:`ensure_text_tower`, once, in a process
of its own; a tower made with another recipe is refused) and SAP's ``text`` anchors read the names from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from engine.checkpoint import Checkpointer
from engine.config import ConfigError, load_config
from engine.fewshot.evaluator import backbone_features, build_eval_loader, evaluate_episodes
from engine.recipes import RUN_DIR, ensure_made, recipe_record, train_recipe
from modeling.module.name_tower import NameTower, name_words, read_name_tower_file, save_name_tower
from utils.io import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerRecipe:
    """How the tower is fitted (``FEWSHOT.TEXT_TOWER``)."""

    embed_dim: int = 128
    width: int = 128
    hidden: int = 256
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: CN) -> TowerRecipe:
        t = cfg.FEWSHOT.TEXT_TOWER
        return cls(t.EMBED_DIM, t.WIDTH, t.HIDDEN, t.STEPS, t.BATCH_SIZE, t.LR, t.WEIGHT_DECAY, t.TEMPERATURE, t.SEED)


@dataclass
class FittedTower:
    """A fitted tower with the image side of the joint space: ``normalize(projection(normalize(f)))``."""

    tower: NameTower
    projection: nn.Linear
    logit_scale: float
    loss: float

    def image_embeddings(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint-space embeddings (n, E) of backbone features (n, D)."""
        with torch.no_grad():
            return F.normalize(self.projection(F.normalize(feats.float().cpu(), dim=-1)), dim=-1)


def fit_name_tower(feats: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], recipe: TowerRecipe
                   ) -> FittedTower:
    """Fit a tower to the names of the classes in ``labels`` (global ids into ``class_names``) against image
    features (n, D): ``recipe.steps`` AdamW steps of the cross-entropy of ``scale * <image, name>`` over every
    training class name, minibatches of ``recipe.batch_size`` images. Seeded by ``recipe.seed`` alone (the global
    random state is left as it was)."""
    feats, labels = F.normalize(feats.float().cpu(), dim=-1), labels.cpu()
    train_ids = sorted(set(labels.tolist()))
    names = [class_names[c] for c in train_ids]
    target = torch.as_tensor([train_ids.index(int(c)) for c in labels.tolist()])
    vocabulary = sorted({w for n in names for w in name_words(n)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        tower = NameTower(vocabulary, recipe.embed_dim, recipe.width, recipe.hidden)
        projection = nn.Linear(feats.shape[1], recipe.embed_dim, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(1.0 / recipe.temperature)))
    params = [*tower.parameters(), *projection.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ids, mask = tower.tokenize(names)
    draw = torch.Generator().manual_seed(recipe.seed)
    loss = torch.zeros(())
    for _ in range(recipe.steps):
        batch = torch.randint(len(feats), (min(recipe.batch_size, len(feats)),), generator=draw)
        images = F.normalize(projection(feats[batch]), dim=-1)
        logits = log_scale.clamp(max=math.log(100.0)).exp() * images @ tower(ids, mask).t()
        loss = F.cross_entropy(logits, target[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tower.requires_grad_(False).eval()
    projection.requires_grad_(False)
    return FittedTower(tower, projection, float(log_scale.detach().exp().clamp(max=100.0)), float(loss.detach()))


class _NearestName(nn.Module):
    """Episode logits from the class names alone (zero-shot): cosine of each query to the N names."""

    def __init__(self, fitted: FittedTower, class_names: Sequence[str]) -> None:
        super().__init__()
        self.fitted, self.names = fitted, fitted.tower.encode(class_names)

    def episode_logits(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                       class_ids: torch.Tensor, n_way: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.fitted.image_embeddings(query) @ self.names[class_ids.cpu()].t(), {}


class _NearestPrototype(nn.Module):
    """Episode logits from the support images alone: cosine of each query to the N class means."""

    def episode_logits(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                       class_ids: torch.Tensor, n_way: int) -> tuple[torch.Tensor, dict[str, Any]]:
        protos = torch.stack([support[support_labels == c].mean(0) for c in range(n_way)])
        return F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).t(), {}


def measure_tower(fitted: FittedTower, feats: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                  cfg: CN) -> dict[str, Any]:
    """Zero-shot (names only) and 1-shot nearest-prototype accuracy on the same fixed-seed test episodes."""
    fs = cfg.FEWSHOT
    shape = dict(n_way=fs.TEST_WAY, k_shot=1, n_query=fs.TEST_QUERY, n_episodes=fs.TEXT_TOWER.EPISODES,
                 seed=fs.EVAL_SEED, z=fs.CI_Z)
    out = {}
    for name, scorer in (("zero_shot", _NearestName(fitted, class_names)), ("prototype_1shot", _NearestPrototype())):
        result = evaluate_episodes(scorer, feats.cpu(), labels.cpu(), desc=f"text tower {name}", **shape)
        out[name] = {k: result[k] for k in ("acc", "ci95", "std", "n_episodes", "n_way", "k_shot", "n_query", "seed")}
    return out


def make_text_tower(recipe: str, out: str | Path, overrides: Sequence[str] = (), resume: str | None = None) -> dict[
        str, Any]:
    """Train the recipe's backbone into ``<out's folder>/run/`` (resumed if interrupted, skipped if finished), fit
    the name tower to its training-class features and write it to ``out`` with the recipe and its test-class
    accuracies (:func:`measure_tower`), which it returns. Sets this process up as a training script does: call it
    from a process of its own (:func:`ensure_text_tower`)."""
    from engine.fewshot.run import FewShotApplication, run

    out = Path(out)
    run_dir = out.parent / RUN_DIR
    opts = [*overrides, "OUTPUT_DIR", str(run_dir)]
    if load_config(recipe, opts).MODEL.SAP.TEXT_TOWER_RECIPE:
        raise ConfigError(f"{recipe} names a MODEL.SAP.TEXT_TOWER_RECIPE itself: a recipe trains its backbone from "
                          "scratch, it does not chain another")
    cfg = train_recipe(recipe, run_dir, opts, run, resume)
    app = FewShotApplication(cfg)
    app.build()
    ckpt = Checkpointer(run_dir)
    ckpt.load(ckpt.latest(), model=app.model, restore_rng=False)
    fs, data = cfg.FEWSHOT, app.data
    train = backbone_features(app.model, build_eval_loader(cfg, data, fs.TRAIN_SPLIT), app.device, app.amp)
    test = backbone_features(app.model, build_eval_loader(cfg, data, fs.TEST_SPLIT), app.device, app.amp)
    fitted = fit_name_tower(*train, data.class_names, TowerRecipe.from_config(cfg))
    results = {**measure_tower(fitted, *test, data.class_names, cfg), "final_loss": fitted.loss,
               "logit_scale": fitted.logit_scale}
    extra = {"recipe": recipe_record(cfg), "results": results, "image_projection": fitted.projection.state_dict()}
    atomic_write(out, lambda handle: save_name_tower(fitted.tower, handle, extra))
    zs, proto = results["zero_shot"], results["prototype_1shot"]
    logger.info("name tower %s: zero-shot %d-way %.2f +- %.2f %% (chance %.1f %%), 1-shot prototype %.2f +- %.2f %%",
                out, zs["n_way"], 100 * zs["acc"], 100 * zs["ci95"], 100 / zs["n_way"], 100 * proto["acc"],
                100 * proto["ci95"])
    return results


def read_tower_record(out: Path) -> dict[str, Any] | None:
    """The recipe and results a tower file records, or ``None`` when there is no readable file."""
    try:
        data = read_name_tower_file(out) if out.is_file() else None
    except (OSError, ValueError, RuntimeError):
        return None
    return None if data is None else {"recipe": data["recipe"], "results": data["results"]}


def makes_text_tower(cfg: CN) -> bool:
    """Whether a run of ``cfg`` makes (when absent) and reads its recipe's name tower: SAP on, ``text`` anchors,
    no CLIP weights (whose text tower comes first), and a ``MODEL.SAP.TEXT_TOWER_RECIPE``."""
    sap = cfg.MODEL.SAP
    return bool(sap.TEXT_TOWER_RECIPE and sap.ENABLED and sap.ANCHOR_MODE == "text" and not cfg.MODEL.CLIP_WEIGHTS)


def ensure_text_tower(cfg: CN) -> None:
    """Make ``MODEL.SAP.TEXT_TOWER`` with ``MODEL.SAP.TEXT_TOWER_RECIPE`` unless it is there already
    (:func:`engine.recipes.ensure_made`); a tower made with another recipe is refused. A run that will not read
    the tower (:func:`makes_text_tower`) does not make it."""
    sap = cfg.MODEL.SAP
    if not makes_text_tower(cfg):
        return
    record = ensure_made(Path(sap.TEXT_TOWER), sap.TEXT_TOWER_RECIPE, make_text_tower, read_tower_record,
                         "name tower", "MODEL.SAP.TEXT_TOWER")
    zs = record["results"]["zero_shot"]
    logger.info("name tower %s (recipe %s): zero-shot %d-way test accuracy %.2f %%", sap.TEXT_TOWER,
                sap.TEXT_TOWER_RECIPE, zs["n_way"], 100 * zs["acc"])
