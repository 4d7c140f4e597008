"""The training step the benchmarks time: the trainer's own step, for either model family.

:func:`build_train_step` builds what training builds (the family's model, objective, optimizer and
:class:`engine.trainer.Stage`, the :class:`engine.trainer.Trainer` with its AMP policy and compilation) and
runs :meth:`Trainer.launch_step` then :meth:`Trainer.settle` on one fixed, device-resident batch of random
images, so a timing measures the model step and not the data pipeline (the ``loader`` task measures that):

* ReID (a config without ``FEWSHOT``): ``SOLVER.IMS_PER_BATCH`` samples (``DATALOADER.NUM_INSTANCE`` per id)
  x 3 modalities at ``INPUT.SIZE_TRAIN``, the criterion and optimizer of ``train_net.py``;
* few-shot: one ``FEWSHOT.N_WAY``-way K-shot episode with ``FEWSHOT.N_QUERY`` queries per class at
  ``FEWSHOT.IMAGE_SIZE``, the ``meta`` stage of ``train_b1_improvement.py`` (``engine.fewshot.build_stage``), or
  a batch of ``FEWSHOT.PRETRAIN.BATCH_SIZE`` images through its ``pretrain`` stage.

The non-finite step guard never stops a benchmark (its limit is lifted), and every build starts from seed 0
(``DETERMINISTIC True`` measures the step under deterministic kernels, i.e. what determinism costs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.device import AmpPolicy, build_amp_policy
from engine.fewshot import build_stage, install_anchors
from engine.reid import ReIDObjective, build_reid_model, build_reid_optimizer
from engine.seed import seed_everything
from engine.trainer import Stage, Trainer, compile_model
from losses import ReIDCriterion
from modeling import build_model
from utils.modalities import MODALITIES


def is_fewshot(cfg: CN) -> bool:
    """Whether ``cfg`` is a few-shot config (it has the few-shot family's ``FEWSHOT`` keys), else ReID."""
    return "FEWSHOT" in cfg


def with_keys(cfg: CN, values: dict[str, Any]) -> CN:
    """A frozen copy of ``cfg`` with the dotted ``values`` set (``{"SOLVER.IMS_PER_BATCH": 8}``)."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in values.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = value
    cfg.freeze()
    return cfg


@dataclass
class TrainStep:
    """One family's training step as the trainer runs it, on ``batch``; calling it runs one step.

    As in training, the host judges a step while the device runs the next one (where the step's checks are
    deferred, ``MONITOR.DEFER_CHECKS``); :meth:`finish` judges the last one.
    """

    trainer: Trainer
    stage: Stage
    #: the bare model; ``run_model`` is what the step trains (compiled with ``MODEL.COMPILE_SCOPE model``)
    model: torch.nn.Module
    run_model: torch.nn.Module
    #: what evaluation runs: compiled when the step is, as the trainer's evaluation is
    eval_model: torch.nn.Module
    #: one batch on the device, as the stage's objective receives it
    batch: Any
    amp: AmpPolicy
    params: list[torch.nn.Parameter] = field(default_factory=list)
    pending: Any = None

    def __call__(self, eager: bool = False) -> None:
        """One optimisation step; ``eager`` runs the bare model's eager ops (the FLOP counter needs them)."""
        trainer = self.trainer
        compiled_step = trainer.compiled_step
        if eager:
            trainer.compiled_step = None
        try:
            launched = trainer.launch_step(self.model if eager else self.run_model, self.stage, self.params,
                                           self.batch, 0.0)
            self.finish()
            if launched.on_device:
                self.pending = launched
            else:
                trainer.settle(self.stage, launched)
        finally:
            trainer.compiled_step = compiled_step

    def finish(self) -> None:
        """Judge the step still waiting for the host, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.trainer.settle(self.stage, pending)


def build_train_step(cfg: CN, precision: str, device: torch.device, compiled: bool = False, *,
                     num_classes: int = 171, num_cameras: int = 4, k_shot: int | None = None,
                     stage: str = "meta") -> TrainStep:
    """A fresh (seed 0) model and its training step in ``precision`` on ``device``; ``compiled`` compiles it as
    ``MODEL.COMPILE`` says (mode ``default`` when the config names none). ReID: ``num_classes`` identities,
    ``num_cameras`` cameras; few-shot: ``k_shot`` shots (default ``FEWSHOT.K_SHOT``) of the ``meta`` stage, or
    the ``pretrain`` stage's batch (``stage``)."""
    keys: dict[str, Any] = {"MONITOR.MAX_NONFINITE_STEPS": 10**9}  # a benchmark never stops on non-finite steps
    if compiled and not cfg.MODEL.COMPILE:
        keys["MODEL.COMPILE"] = "default"
    if is_fewshot(cfg):
        keys.update({"FEWSHOT.K_SHOT": k_shot or cfg.FEWSHOT.K_SHOT, "DATALOADER.NUM_WORKERS": 0})
    cfg = with_keys(cfg, keys)
    seed_everything(0, deterministic=cfg.DETERMINISTIC, attention=cfg.DETERMINISTIC_ATTENTION,
                    fill_uninitialized=cfg.DETERMINISTIC_FILL_UNINITIALIZED)
    amp = build_amp_policy(precision, device)
    if is_fewshot(cfg):
        model, built, batch = _fewshot_stage(cfg, amp, device, stage)
    else:
        model, built, batch = _reid_stage(cfg, device, num_classes, num_cameras)
    trainer = Trainer(cfg, model, device, amp, ckpt=None, metrics=None, stages=(built.name,))
    run_model = trainer.compile_stage(built, model) if compiled else model
    eval_model = compile_model(model, cfg.MODEL.COMPILE) if trainer.compiled_step is not None else run_model
    params = [p for g in built.optimizer.param_groups for p in g["params"]]  # clipped together, as in training
    return TrainStep(trainer, built, model, run_model, eval_model, batch, amp, params)


def reid_batch(cfg: CN, device: torch.device, num_classes: int, num_cameras: int, batch: int) -> dict[str, Any]:
    """A device batch as the ReID loader gives it: ``batch`` samples of ``DATALOADER.NUM_INSTANCE`` per id,
    random images ``{modality: (B, 3, H, W)}`` at ``INPUT.SIZE_TRAIN``, every modality present."""
    h, w = cfg.INPUT.SIZE_TRAIN
    k = cfg.DATALOADER.NUM_INSTANCE
    g = torch.Generator(device="cpu").manual_seed(0)
    images = {m: torch.randn(batch, 3, h, w, generator=g).to(device) for m in MODALITIES}
    pids = (torch.arange(batch) // k % num_classes).to(device)
    camids = torch.randint(0, num_cameras, (batch,), generator=g).to(device)
    masks = torch.ones(batch, len(MODALITIES), dtype=torch.bool, device=device)
    return {"images": images, "pids": pids, "camids": camids, "masks": masks}


def episode_batch(cfg: CN, device: torch.device) -> dict[str, torch.Tensor]:
    """A device episode as the few-shot loader gives it: ``support`` (N*K, 3, S, S), ``support_labels``,
    ``query`` (N*Q, 3, S, S), ``query_labels`` (0..N-1) and ``class_ids`` (N,), random images."""
    fs = cfg.FEWSHOT
    n, k, q, size = fs.N_WAY, fs.K_SHOT, fs.N_QUERY, fs.IMAGE_SIZE
    g = torch.Generator(device="cpu").manual_seed(0)
    return {"support": torch.randn(n * k, 3, size, size, generator=g).to(device),
            "support_labels": torch.arange(n, device=device).repeat_interleave(k),
            "query": torch.randn(n * q, 3, size, size, generator=g).to(device),
            "query_labels": torch.arange(n, device=device).repeat_interleave(q),
            "class_ids": torch.arange(n, device=device)}


def _reid_stage(cfg: CN, device: torch.device, num_classes: int, num_cameras: int) -> tuple:
    """The ReID model, its one ``train`` stage (criterion, optimizer) and a batch of ``SOLVER.IMS_PER_BATCH``."""
    model = build_reid_model(cfg, num_classes, num_cameras).to(device)
    criterion = ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None)).to(device)
    optimizer = build_reid_optimizer(cfg, model, criterion)
    batch = reid_batch(cfg, device, num_classes, num_cameras, cfg.SOLVER.IMS_PER_BATCH)
    stage = Stage("train", [batch], 1, ReIDObjective(criterion, device), optimizer, scheduler=None)
    return model, stage, batch


def pretrain_batch(cfg: CN, device: torch.device) -> dict[str, torch.Tensor]:
    """A device batch as the pre-training loader gives it: ``FEWSHOT.PRETRAIN.BATCH_SIZE`` random ``images`` at
    ``FEWSHOT.IMAGE_SIZE`` and their ``labels`` over the ``MODEL.NUM_CLASSES`` training classes."""
    size, n = cfg.FEWSHOT.IMAGE_SIZE, cfg.FEWSHOT.PRETRAIN.BATCH_SIZE
    g = torch.Generator(device="cpu").manual_seed(0)
    return {"images": torch.randn(n, 3, size, size, generator=g).to(device),
            "labels": torch.randint(0, cfg.MODEL.NUM_CLASSES, (n,), generator=g).to(device)}


def _fewshot_stage(cfg: CN, amp: AmpPolicy, device: torch.device, name: str = "meta") -> tuple:
    """The few-shot model (anchors installed), its ``name`` stage as ``build_stage`` makes it (over a stand-in
    data set of placeholder items: the benchmark never reads the loader) and one episode or batch."""
    fs = cfg.FEWSHOT
    classes = max(fs.N_WAY, fs.TEST_WAY)
    per_class = max(fs.K_SHOT + fs.N_QUERY, -(-fs.PRETRAIN.BATCH_SIZE // classes))  # one episode or batch
    items = [(f"random/{c}/{i}.png", c) for c in range(classes) for i in range(per_class)]
    data = SimpleNamespace(splits={fs.TRAIN_SPLIT: items, fs.VAL_SPLIT: items, fs.TEST_SPLIT: items}, arrays=None,
                           class_names=[f"class {c}" for c in range(max(classes, cfg.MODEL.NUM_CLASSES))])
    model = build_model(cfg).to(device)
    install_anchors(cfg, model, data, device)
    stage = build_stage(name, cfg, model, data, device, amp)
    return model, stage, pretrain_batch(cfg, device) if name == "pretrain" else episode_batch(cfg, device)
