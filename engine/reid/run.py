"""Multi-modal ReID (DeMo, DeMo-SDTPS): what ``train_net.py`` runs.

:class:`ReIDApplication` says what is ReID's own in a run of :func:`engine.application.run_application`: one stage,
``train`` (P x K batches, :class:`engine.reid.objective.ReIDObjective`, the model's and the criterion's optimizer
groups, :class:`engine.reid.evaluator.ReIDEvaluator`), and what a finished run writes (``results_final.json``,
the figures, then ``summary.json``, last: it marks the run finished).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from engine.application import Application, run_application
from engine.checkpoint import unwrap
from engine.logger import MetricsLogger
from engine.reid.evaluator import ReIDEvaluator, missing_record, scalar_metrics, write_results
from engine.reid.missing import canonical, missing_modalities
from engine.reid.objective import ReIDObjective
from engine.reid.setup import ReIDSetup, build_reid_optimizer, build_reid_setup
from engine.reid.visualize import make_figures
from engine.solver import build_scheduler
from engine.trainer import Stage, StageResult, Trainer
from losses.reid_criterion import ReIDCriterion

logger = logging.getLogger(__name__)

STAGE = "train"  # a ReID run has one stage


class ReIDApplication(Application):
    """A ReID run: one ``train`` stage, retrieval on the test split."""

    setup: ReIDSetup

    def stage_epochs(self) -> list[tuple[str, int]]:
        return [(STAGE, self.cfg.SOLVER.MAX_EPOCHS)]

    def build(self) -> None:
        self.setup = setup = build_reid_setup(self.cfg)
        self.model, self.device, self.amp = setup.model, setup.device, setup.amp
        self.criterion = ReIDCriterion(self.cfg, bn_feat_dim=getattr(self.model, "bn_feat_dim", None)).to(self.device)
        self.evaluator = ReIDEvaluator(setup, self.cfg)

    def build_stage(self, name: str) -> Stage:
        cfg = self.cfg
        loader = datasets.reid_train_loader(cfg, self.setup.data.train)
        if loader.batch_sampler.batches_per_epoch == 0:
            raise ValueError(f"the train split gives no P x K batch of {cfg.SOLVER.IMS_PER_BATCH}; "
                             "lower SOLVER.IMS_PER_BATCH")
        optimizer = build_reid_optimizer(cfg, self.model, self.criterion)
        scheduler = build_scheduler(cfg, optimizer, loader.batch_sampler.batches_per_epoch)
        return Stage(STAGE, loader, cfg.SOLVER.MAX_EPOCHS, ReIDObjective(self.criterion, self.device), optimizer,
                     scheduler, evaluator=self.evaluator, samples_per_step=cfg.SOLVER.IMS_PER_BATCH)

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        return self.evaluator(model)

    def finish(self, trainer: Trainer, fits: dict[str, StageResult], metrics: MetricsLogger) -> tuple[
            dict[str, Any], dict[str, Any]]:
        cfg, out_dir, fit = self.cfg, Path(self.cfg.OUTPUT_DIR), fits.get(STAGE)
        results = fit.results if fit is not None and fit.results is not None else self.evaluator(self.model)
        best = {"mAP": fit.best["score"], "epoch": fit.best["epoch"]} if fit is not None else {"mAP": -float("inf"),
                                                                                                 "epoch": -1}
        write_results(out_dir, results, "final", {"epochs": cfg.SOLVER.MAX_EPOCHS, "best": best, **missing_record(cfg)})
        self._figures(out_dir, unwrap(self.model))
        summary = {**scalar_metrics(results), "best_mAP": best["mAP"], "best_epoch": best["epoch"],
                   "steps": trainer.run.step, "stability": trainer.spikes.stability,
                   "skipped_steps": float(trainer.guard.skipped)}
        return results, summary

    def eval_folder(self) -> str:
        miss = self.cfg.TEST.MISS
        return "eval_all" if not missing_modalities(miss) else f"eval_miss_{canonical(miss)}"

    def write_evaluation(self, eval_dir: Path, results: dict[str, Any], weights: Path, state: dict[str, Any],
                         metrics: MetricsLogger) -> None:
        for line in self.evaluator.lines(results):
            logger.info(line)
        write_results(eval_dir, results, "eval", {"checkpoint": str(weights), "epoch": state["epoch"],
                                                  **missing_record(self.cfg)})
        self._figures(eval_dir, self.model)
        metrics.log(scalar_metrics(results), step=state["step"], prefix="test")

    def _figures(self, out_dir: Path, model: torch.nn.Module) -> None:
        setup = self.setup
        make_figures(out_dir, setup.data, self.evaluator.extracted, setup.num_query, self.cfg, model)


def run_reid(cfg: CN, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval-only`` evaluate) the configured ReID model; returns the final metrics."""
    return run_application(ReIDApplication(cfg), resume=args.resume, eval_only=args.eval_only)
