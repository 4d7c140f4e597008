"""What a ReID run builds before training or evaluating: the checked names, the data set, the test loader, the
model (``MODEL.PRETRAIN_PATH`` loaded, a synthetic tower pretrained first if the config names a recipe) and the
optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from engine.checkpoint import unwrap
from engine.config import ConfigError
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.reid.evaluator import evaluate
from engine.reid.family import REID
from engine.reid.missing import present_modalities
from engine.reid.tower_pretrain import ensure_pretrained_tower
from engine.solver import build_model_optimizer
from losses.reid_criterion import ReIDCriterion
from modeling import MODEL_REGISTRY, build_model
from modeling.param_groups import ParamRules


def check_names(cfg: CN, family: tuple[str, ...]) -> None:
    """Fail before any data is read if the model or dataset name is unknown or of the wrong family."""
    MODEL_REGISTRY.get(cfg.MODEL.NAME or "<empty MODEL.NAME>")
    name = cfg.DATASETS.NAMES
    if name not in family:
        datasets.DATASET_REGISTRY.get(name or "<empty DATASETS.NAMES>")  # unknown: "not implemented yet"
        raise ConfigError(f"DATASETS.NAMES '{name}' is not a dataset of this task (expected one of {family})")


def synthetic_kwargs(cfg: CN) -> dict[str, Any]:
    """Generator arguments for ``synthetic_rgbnt`` from ``DATASETS.SYNTHETIC`` (none for real sets)."""
    if cfg.DATASETS.NAMES != "synthetic_rgbnt":
        return {}
    syn = cfg.DATASETS.SYNTHETIC
    kwargs: dict[str, Any] = {}
    if syn.PRESET:
        kwargs["preset"] = syn.PRESET
    if syn.MISSING_MODALITY_PROB >= 0:
        kwargs["missing_modality_prob"] = syn.MISSING_MODALITY_PROB
    if syn.SEED >= 0:
        kwargs["seed"] = syn.SEED
    return kwargs


def build_reid_model(cfg: CN, num_classes: int, num_cameras: int) -> torch.nn.Module:
    """The configured model with ``num_classes`` identities and ``num_cameras`` SIE rows."""
    model_cfg = cfg.clone()
    model_cfg.defrost()
    model_cfg.MODEL.NUM_CLASSES = num_classes
    model_cfg.MODEL.NUM_CAMERAS = max(num_cameras, 1)
    model_cfg.freeze()
    return build_model(model_cfg)


def param_rules(cfg: Any) -> ParamRules:
    """The per-tensor rate and decay rules of ``SOLVER.BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``,
    ``DECAY_ALL_TENSORS`` and ``LARGE_FC_LR`` of the ReID keys."""
    s = cfg.SOLVER
    return ParamRules(bias_lr_factor=float(s.BIAS_LR_FACTOR), weight_decay_bias=float(s.WEIGHT_DECAY_BIAS),
                      decay_all=bool(s.DECAY_ALL_TENSORS), large_fc_lr=bool(s.LARGE_FC_LR))


def build_reid_optimizer(cfg: CN, model: torch.nn.Module, criterion: ReIDCriterion) -> torch.optim.Optimizer:
    """The optimizer ``train_net.py`` trains with: the model's groups (backbone at ``SOLVER.BACKBONE_LR``, new
    modules at ``SOLVER.BASE_LR``, biases, 1-D tensors and classifiers by ``SOLVER.BIAS_LR_FACTOR``,
    ``WEIGHT_DECAY_BIAS``, ``DECAY_ALL_TENSORS``, ``LARGE_FC_LR``) and the criterion's own."""
    s = cfg.SOLVER
    groups = unwrap(model).param_groups(cfg.SOLVER.BASE_LR, s.WEIGHT_DECAY,
                                        backbone_lr=s.BACKBONE_LR if s.BACKBONE_LR > 0 else None,
                                        rules=param_rules(cfg))
    return build_model_optimizer(cfg, [*groups, *criterion.param_groups(s.WEIGHT_DECAY)], s.BASE_LR)


def resolve_test_modalities(cfg: CN) -> tuple[str, ...]:
    """Modalities present at test time under ``TEST.MISS`` (DeMo's meaning: the letters name the missing)."""
    return present_modalities(cfg.TEST.MISS)


@dataclass
class ReIDSetup:
    """What training and evaluation share: the data, the test loader and the model on its device."""

    data: Any
    test_loader: Any
    num_query: int
    model: torch.nn.Module
    device: torch.device
    amp: AmpPolicy

    def evaluate(self, cfg: CN, miss: str | None = None, model: torch.nn.Module | None = None) -> tuple[
            dict[str, dict[str, Any]], dict[str, Any]]:
        """:func:`evaluate` on the test split under ``TEST.MISS`` ``miss`` (default: the config's) of ``model``
        (default: the setup's)."""
        return evaluate(model if model is not None else self.model, self.test_loader, self.num_query, cfg,
                        self.device, self.amp, miss=miss, protocol=self.data.eval_protocol)


def build_reid_setup(cfg: CN) -> ReIDSetup:
    """Parse the data set, build the test loader and the model (``MODEL.PRETRAIN_PATH`` loaded) on the device."""
    check_names(cfg, REID.datasets)
    device = resolve_device(cfg.DEVICE.NAME)
    amp = build_amp_policy(cfg.DEVICE.PRECISION, device)
    data = datasets.build_dataset(
        cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, allow_missing_modality=cfg.DATASETS.ALLOW_MISSING_MODALITY,
        skip_corrupt=cfg.DATASETS.SKIP_CORRUPT, verify_images=cfg.DATASETS.VERIFY_IMAGES, **synthetic_kwargs(cfg),
    )
    test_loader = datasets.reid_test_loader(cfg, data.query + data.gallery)
    ensure_pretrained_tower(cfg)
    model = build_reid_model(cfg, data.num_train_pids, data.num_train_cams).to(device)
    return ReIDSetup(data, test_loader, len(data.query), model, device, amp)

