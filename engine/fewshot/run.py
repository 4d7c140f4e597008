"""Few-shot training of ExpB1 + SAP: what ``train_b1_improvement.py`` runs.

:class:`FewShotApplication` says what is few-shot's own in a run of :func:`engine.application.run_application`:

1. data: ``DATASETS.NAMES`` under ``DATASETS.ROOT_DIR``, checked against ``FEWSHOT``; SAP's anchors made from
   the class names (:mod:`engine.fewshot.data`);
2. the stages of ``FEWSHOT.STAGES`` (``pretrain``, ``meta``), starting from the network that
   ``FEWSHOT.PRETRAIN.RECIPE`` trained for this seed when one is named (:mod:`engine.fewshot.pretrained`), each
   built by :func:`build_stage`: its loader, :class:`engine.fewshot.objective.PretrainObjective` or
   ``EpisodeObjective``, SGD from
   ``model.get_parameters()`` (``logit_scale_log`` alone at weight decay 0.0), the schedule, and validation
   episodes (:class:`engine.fewshot.evaluator.FewShotEvaluator`);
3. test: ``FEWSHOT.TEST_EPISODES`` fixed-seed episodes per shot of ``FEWSHOT.TEST_SHOTS``, written as
   ``eval_results.json`` + ``eval_results.txt``;
4. the SAP plot ``sap_stats.png`` (also to W&B), then ``summary.json`` (last: the run is finished).

Epochs are numbered across stages (``checkpoint_epoch0003.pth`` may be the first meta epoch after two
pre-training epochs); ``--resume`` continues in the stage and epoch the checkpoint was written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from datasets.loader import fewshot_train_loader
from engine.application import Application, run_application
from engine.checkpoint import unwrap
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.fewshot.data import install_anchors, load_fewshot_data
from engine.fewshot.evaluator import FewShotEvaluator, evaluate_split, write_results
from engine.fewshot.objective import EpisodeObjective, PretrainObjective
from engine.fewshot.plots import SAP_PLOT, plot_sap_stats
from engine.fewshot.pretrained import ensure_pretrained, load_pretrained
from engine.fewshot.text_tower import ensure_text_tower
from engine.logger import MetricsLogger
from engine.solver import WarmupScheduler, build_model_optimizer, build_scheduler
from engine.trainer import Stage, StageResult, Trainer
from losses.classification import ClassificationCriterion
from modeling import build_model

logger = logging.getLogger(__name__)

SAP_STATS = ("attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped")


class FewShotApplication(Application):
    """A few-shot run: the stages of ``FEWSHOT.STAGES``, then test episodes."""

    data: Any

    def stage_epochs(self) -> list[tuple[str, int]]:
        return [(name, stage_epochs(self.cfg, name)) for name in self.cfg.FEWSHOT.STAGES]

    def build(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.DEVICE.NAME)
        self.amp = build_amp_policy(cfg.DEVICE.PRECISION, self.device)
        self.data = load_fewshot_data(cfg)
        ensure_text_tower(cfg)  # made on first use from MODEL.SAP.TEXT_TOWER_RECIPE
        self.model = build_model(cfg).to(self.device)
        install_anchors(cfg, self.model, self.data, self.device)

    def load_start(self) -> None:
        path = ensure_pretrained(self.cfg)  # made on first use from FEWSHOT.PRETRAIN.RECIPE
        if path is not None:
            load_pretrained(self.model, path)

    def build_stage(self, name: str) -> Stage:
        return build_stage(name, self.cfg, self.model, self.data, self.device, self.amp)

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        fs = self.cfg.FEWSHOT
        return evaluate_split(self.cfg, model, self.data, fs.TEST_SPLIT, self.device, shots=fs.TEST_SHOTS,
                              n_episodes=fs.TEST_EPISODES, amp=self.amp)

    def finish(self, trainer: Trainer, fits: dict[str, StageResult], metrics: MetricsLogger) -> tuple[
            dict[str, Any], dict[str, Any]]:
        cfg, out_dir = self.cfg, Path(self.cfg.OUTPUT_DIR)
        final_model = unwrap(self.model)
        best = trainer.ckpt.path_for("best")
        if cfg.FEWSHOT.TEST_CHECKPOINT == "best" and best.is_file():
            trainer.ckpt.load(best, model=final_model, restore_rng=False)
            logger.info("testing the best validation checkpoint %s", best)
        results = self.evaluate(final_model)
        line = write_results(out_dir, results, label=f"{cfg.MODEL.NAME} on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}")
        logger.info(line)
        step = trainer.run.step
        metrics.log(flat_results(results), step=step, prefix="test")
        plot = make_plots(cfg, out_dir, metrics, step)
        # the plot is named relative to the run folder, so two identical runs write the same summary.json
        summary = {**flat_results(results), "steps": step, "epochs": trainer.run.global_epoch,
                   "summary_line": line, "plot": plot.name if plot else ""}
        summary.update(final_sap_state(final_model))
        return results, summary

    def write_evaluation(self, eval_dir: Path, results: dict[str, Any], weights: Path, state: dict[str, Any],
                         metrics: MetricsLogger) -> None:
        cfg = self.cfg
        label = f"{cfg.MODEL.NAME} ({Path(weights).name}) on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}"
        logger.info(write_results(eval_dir, results, label))
        metrics.log(flat_results(results), step=state["step"], prefix="test")


def run(cfg: CN, args: argparse.Namespace) -> dict[str, Any]:
    """Train the configured stages and test, or (``--eval-only``) test a checkpoint; returns the test results."""
    return run_fewshot(cfg, resume=args.resume, eval_only=args.eval_only)


def run_fewshot(cfg: CN, resume: str | None = None, eval_only: bool = False) -> dict[str, Any]:
    """:func:`run` with ``resume`` (``None``, ``"auto"`` or a path) and ``eval_only`` given directly."""
    return run_application(FewShotApplication(cfg), resume=resume, eval_only=eval_only)


def build_stage(name: str, cfg: CN, model: torch.nn.Module, data: Any, device: torch.device, amp: AmpPolicy) -> Stage:
    """The ``pretrain`` (batches over the training classes) or ``meta`` (episodes) stage."""
    fs, s = cfg.FEWSHOT, cfg.SOLVER
    loader = fewshot_train_loader(cfg, data.splits[fs.TRAIN_SPLIT], data.arrays, name)
    criterion = ClassificationCriterion()
    if name == "pretrain":
        epochs, base_lr, objective = fs.PRETRAIN.EPOCHS, fs.PRETRAIN.BASE_LR, PretrainObjective(criterion, device)
    else:
        epochs, base_lr, objective = s.MAX_EPOCHS, s.BASE_LR, EpisodeObjective(criterion, device)
    groups = [{"lr": base_lr, "weight_decay": s.WEIGHT_DECAY, **group} for group in unwrap(model).get_parameters()]
    optimizer = build_model_optimizer(cfg, groups, base_lr)
    steps = loader.batch_sampler.batches_per_epoch
    if name == "pretrain":
        scheduler = WarmupScheduler(optimizer, total_steps=epochs * steps, warmup_steps=fs.PRETRAIN.WARMUP_EPOCHS * steps,
                                    warmup_factor=s.WARMUP_FACTOR, mode="cosine", min_factor=s.MIN_LR_FACTOR)
    else:
        scheduler = build_scheduler(cfg, optimizer, steps)
    return Stage(name, loader, epochs, objective, optimizer, scheduler,
                 evaluator=FewShotEvaluator(cfg, data, device, amp, name),
                 log_prefix="pretrain" if name == "pretrain" else "train", find_unused_parameters=True,
                 describe=lambda: f", lr {base_lr:g}, {len(optimizer.param_groups)} parameter groups",
                 samples_per_step=fs.PRETRAIN.BATCH_SIZE if name == "pretrain" else 0)



def stage_epochs(cfg: CN, name: str) -> int:
    """The epochs the config asks of stage ``name``."""
    return cfg.FEWSHOT.PRETRAIN.EPOCHS if name == "pretrain" else cfg.SOLVER.MAX_EPOCHS


def make_plots(cfg: CN, out_dir: Path, metrics: MetricsLogger, step: int) -> Path | None:
    """``sap_stats.png`` from ``metrics.jsonl`` (also sent to W&B); None when disabled or SAP is off."""
    if not cfg.FEWSHOT.PLOT or not (out_dir / "metrics.jsonl").is_file():
        return None
    path = plot_sap_stats(out_dir / "metrics.jsonl", out_dir / SAP_PLOT, cfg.FEWSHOT.N_WAY, cfg.MODEL.SAP.LOGIT_SCALE_MAX)
    if path is not None:
        metrics.log_image("sap_stats", path, step=step)
        logger.info("SAP stats plot: %s", path)
    return path


def final_sap_state(model: torch.nn.Module) -> dict[str, float]:
    sap = getattr(model, "sap", None)
    if sap is None:
        return {}
    return {"final_logit_scale": float(sap.logit_scale.value()), "final_purify_weight": float(sap.purify_weight.value())}


def flat_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key, r in results.items():
        out[f"{key}/acc"] = r["acc"]
        out[f"{key}/ci95"] = r["ci95"]
        for stat in ("attn_entropy", "attn_max"):
            if stat in r:
                out[f"{key}/{stat}"] = r[stat]
    return out
