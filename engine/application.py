"""A run of either family, written once: resume or load weights, train each stage, test, write the summary;
or, with ``--eval-only``, evaluate a checkpoint into a folder of its own.

A family supplies an :class:`Application`: how to build its data and model, each stage
(:class:`engine.trainer.Stage`), its test evaluation and what a finished run writes. :func:`run_application`
does the rest, the same for both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.checkpoint import (
    Checkpointer,
    eval_weights,
    read_checkpoint,
    resolve_resume,
    warn_config_differences,
)
from engine.defaults import refuse_finished_resume
from engine.device import AmpPolicy
from engine.logger import MetricsLogger
from engine.trainer import Stage, StageResult, Trainer
from utils.distributed import is_main_process
from utils.io import fresh_folder

logger = logging.getLogger(__name__)


class Application:
    """What a model family says about its runs; :func:`run_application` calls these in order.

    After :meth:`build`, ``model`` (on ``device``), ``device`` and ``amp`` are set.
    """

    model: torch.nn.Module
    device: torch.device
    amp: AmpPolicy

    def __init__(self, cfg: CN) -> None:
        self.cfg = cfg

    def stage_epochs(self) -> list[tuple[str, int]]:
        """The run's stages in order, each with the epochs the config asks of it."""
        raise NotImplementedError

    def build(self) -> None:
        """Read the data and build the model on its device (weights of ``MODEL.PRETRAIN_PATH`` loaded)."""
        raise NotImplementedError

    def build_stage(self, name: str) -> Stage:
        """Stage ``name``: its loader, objective, optimizer, schedule and evaluator."""
        raise NotImplementedError

    def load_start(self) -> None:
        """Load what a fresh training run starts from beyond the model as built (the few-shot family's shared
        pre-training); not called when a run resumes or only evaluates. Nothing by default."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """The test evaluation of ``model`` (``--eval-only`` and the end of a run)."""
        raise NotImplementedError

    def finish(self, trainer: Trainer, fits: dict[str, StageResult], metrics: MetricsLogger) -> tuple[
            dict[str, Any], dict[str, Any]]:
        """After training (rank 0): test, write the results and figures; returns ``(results, summary)``."""
        raise NotImplementedError

    def eval_folder(self) -> str:
        """The name of the folder an ``--eval-only`` run writes into (``-2``, ``-3`` appended when taken)."""
        return "eval"

    def write_evaluation(self, eval_dir: Path, results: dict[str, Any], weights: Path, state: dict[str, Any],
                         metrics: MetricsLogger) -> None:
        """Write an ``--eval-only`` run's results (and figures) into ``eval_dir``."""
        raise NotImplementedError


def run_application(app: Application, resume: str | None = None, eval_only: bool = False) -> dict[str, Any]:
    """Train the family's stages and test (or, ``eval_only``, evaluate a checkpoint); returns the test results.

    ``resume``: ``None`` (fresh run), ``"auto"`` (newest checkpoint in ``OUTPUT_DIR``) or a path.
    """
    cfg = app.cfg
    out_dir = Path(cfg.OUTPUT_DIR)
    ckpt = Checkpointer(out_dir, background=cfg.SOLVER.CHECKPOINT_ASYNC)
    resume_path = resolve_resume(ckpt, resume)
    state = None
    if resume_path is not None and not eval_only:
        state = read_checkpoint(resume_path, out_dir)
        refuse_finished_resume(out_dir, state, app.stage_epochs())
    app.build()
    if eval_only:
        return evaluate_only(app, ckpt, resume_path)
    with MetricsLogger.from_config(cfg) as metrics:
        if state is None:
            app.load_start()
        resume_or_load(app.model, ckpt, state, resume_path, cfg.MODEL.WEIGHTS)
        trainer = Trainer(cfg, app.model, app.device, app.amp, ckpt, metrics,
                          stages=tuple(name for name, _ in app.stage_epochs()), resume=state)
        fits = {name: trainer.fit(app.build_stage(name))
                for name, epochs in app.stage_epochs() if trainer.pending(name, epochs)}
        if not is_main_process():
            return {}
        results, summary = app.finish(trainer, fits, metrics)
        metrics.summary(summary)  # written last: marks the run as finished
        return results


def resume_or_load(model: torch.nn.Module, ckpt: Checkpointer, state: dict[str, Any] | None,
                   resume_path: Path | None, weights: str) -> None:
    """The weights a run starts from: the resumed checkpoint's (the rest of its state is restored when its stage
    starts), else ``MODEL.WEIGHTS`` (fine-tuning: a fresh schedule), else the model as built."""
    if state is not None:
        Checkpointer.restore_model(state, resume_path, model)
    elif weights:
        ckpt.load(Path(weights), model=model, restore_rng=False)
        logger.info("starting from the weights of %s (MODEL.WEIGHTS)", weights)


def evaluate_only(app: Application, ckpt: Checkpointer, resume_path: Path | None) -> dict[str, Any]:
    """``--eval-only``: evaluate ``--resume PATH``, else ``MODEL.WEIGHTS``, else the run's newest checkpoint, and
    write everything into a folder of its own (:meth:`Application.eval_folder`), so a run's own results, figures
    and metrics stay as they were."""
    cfg = app.cfg
    weights = eval_weights(ckpt, resume_path, cfg.MODEL.WEIGHTS)
    state = ckpt.load(weights, model=app.model, restore_rng=False)
    warn_config_differences(state, cfg, weights)
    results = app.evaluate(app.model)
    if not is_main_process():  # rank 0 writes the evaluation
        return results
    eval_dir = fresh_folder(cfg.OUTPUT_DIR, app.eval_folder())
    with MetricsLogger.from_config(cfg, output_dir=eval_dir) as metrics:
        app.write_evaluation(eval_dir, results, weights, state, metrics)
    logger.info("evaluation written to %s", eval_dir)
    return results
