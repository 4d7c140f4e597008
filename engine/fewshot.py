"""Few-shot training of ExpB1 + SAP: pre-training (batch classification) then episodic meta-training.

``python train_b1_improvement.py --config_file configs/synthetic/ExpB1_SAP.yml`` calls
:func:`main`. The run, top to bottom (:func:`run_fewshot`):

1. data: ``datasets.build_dataset(DATASETS.NAMES, DATASETS.ROOT_DIR)``; SAP text anchors are
   encoded once per class name (cached on disk) when ``MODEL.SAP.ANCHOR_MODE`` is ``text``;
2. for each stage of ``FEWSHOT.STAGES`` (``pretrain``, ``meta``), :func:`build_stage` says what is
   the stage's own (its loader, :class:`PretrainObjective` or :class:`EpisodeObjective`, SGD from
   ``model.get_parameters()`` with ``logit_scale_log`` alone at weight decay 0.0, the schedule,
   validation episodes as :class:`FewShotEvaluator`) and :class:`engine.trainer.Trainer` runs it:
   AMP, clipping over the union of the groups' parameters, the non-finite step guard and the
   spike detector, metrics every ``SOLVER.LOG_PERIOD`` steps (loss, accuracy, lr, grad norm and
   the four SAP stats ``attn_entropy``, ``attn_max``, ``logit_scale``, ``logit_scale_clipped``,
   means over the period), validation every ``SOLVER.EVAL_PERIOD`` epochs, a checkpoint every
   ``SOLVER.CHECKPOINT_PERIOD`` epochs and at the end of the stage;
3. test: ``FEWSHOT.TEST_EPISODES`` fixed-seed episodes per shot of ``FEWSHOT.TEST_SHOTS``
   (:mod:`engine.fewshot_eval`), written as ``eval_results.json`` + ``eval_results.txt``;
4. the SAP plot ``sap_stats.png`` (also to W&B), then ``summary.json`` (last: the run is finished).

Epochs are numbered across stages (``checkpoint_epoch0003.pth`` may be the first meta epoch
after two pre-training epochs); ``--resume`` continues from the newest checkpoint in the
stage and epoch it was written, with model, optimizer, scheduler, scaler, monitors and RNG
restored (bit-identical on the CPU with ``DATALOADER.NUM_WORKERS 0``).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from datasets.loader import fewshot_train_loader
from engine.checkpoint import (
    Checkpointer,
    eval_weights,
    read_checkpoint,
    resolve_resume,
    unwrap,
    warn_config_differences,
)
from engine.config import ConfigError
from engine.defaults import default_setup, refuse_finished_resume
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.fewshot_eval import evaluate_split, write_results
from engine.logger import MetricsLogger
from engine.plots import SAP_PLOT, plot_sap_stats
from engine.solver import WarmupScheduler, build_model_optimizer, build_scheduler
from engine.trainer import Stage, Trainer
from losses.classification import ClassificationCriterion
from modeling import build_model
from modeling.module.semantic_anchors import encode_class_names
from utils.distributed import is_main_process
from utils.io import fresh_folder

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "meta")
SAP_STATS = ("attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Entry of ``train_b1_improvement.py``: config and run folder, then train or evaluate."""
    cfg = default_setup(args)
    return run_fewshot(cfg, resume=args.resume, eval_only=args.eval_only)


def run_fewshot(cfg: CN, resume: str | None = None, eval_only: bool = False) -> dict[str, Any]:
    """Train the configured stages and test, or (``eval_only``) test a checkpoint; returns the test results.

    ``resume``: ``None`` (fresh run), ``"auto"`` (newest checkpoint in ``OUTPUT_DIR``) or a path.
    """
    out_dir = Path(cfg.OUTPUT_DIR)  # FEWSHOT.STAGES was checked when the config loaded
    device = resolve_device(cfg.DEVICE.NAME)
    amp = build_amp_policy(cfg.DEVICE.PRECISION, device)

    # ---- data and model
    data = load_fewshot_data(cfg)
    model = build_model(cfg).to(device)
    install_anchors(cfg, model, data, device)
    ckpt = Checkpointer(out_dir, background=cfg.SOLVER.CHECKPOINT_ASYNC)
    resume_path = resolve_resume(ckpt, resume)
    if eval_only:
        return evaluate_only(cfg, model, data, device, amp, ckpt, resume_path)
    state = None
    if resume_path is not None:
        state = read_checkpoint(resume_path, out_dir)
        refuse_finished_resume(out_dir, state, [(name, stage_epochs(cfg, name)) for name in cfg.FEWSHOT.STAGES])
        Checkpointer.restore_model(state, resume_path, model)
    with MetricsLogger.from_config(cfg) as metrics:
        trainer = Trainer(cfg, model, device, amp, ckpt, metrics, stages=tuple(cfg.FEWSHOT.STAGES), resume=state)
        for name in cfg.FEWSHOT.STAGES:
            if trainer.pending(name, stage_epochs(cfg, name)):
                trainer.fit(build_stage(name, cfg, model, data, device, amp))

        # ---- test, plot, summary (last)
        final_model = unwrap(model)
        if cfg.FEWSHOT.TEST_CHECKPOINT == "best" and ckpt.path_for("best").is_file():
            ckpt.load(ckpt.path_for("best"), model=final_model, restore_rng=False)
            logger.info("testing the best validation checkpoint %s", ckpt.path_for("best"))
        results = evaluate_split(cfg, final_model, data, cfg.FEWSHOT.TEST_SPLIT, device,
                                 shots=cfg.FEWSHOT.TEST_SHOTS, n_episodes=cfg.FEWSHOT.TEST_EPISODES, amp=amp)
        line = write_results(out_dir, results, label=f"{cfg.MODEL.NAME} on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}")
        logger.info(line)
        step = trainer.run.step
        metrics.log(_flat_results(results), step=step, prefix="test")
        plot = make_plots(cfg, out_dir, metrics, step)
        summary = {**_flat_results(results), "steps": step, "epochs": trainer.run.global_epoch,
                   "summary_line": line, "plot": str(plot) if plot else ""}
        summary.update(_final_sap_state(final_model))
        metrics.summary(summary)  # written last: marks the run as finished
        return results


# ---------------------------------------------------------------------------------------------
# What a few-shot stage is: its loader, its loss, its optimizer and schedule, its validation
# ---------------------------------------------------------------------------------------------
class PretrainObjective:
    """Pre-training: batch classification over the training classes (cross-entropy, accuracy)."""

    def __init__(self, criterion: ClassificationCriterion, device: torch.device) -> None:
        self.criterion, self.device = criterion, device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["images"])

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor], epoch: float) -> tuple[torch.Tensor, dict,
                                                                                         dict[str, Any]]:
        logits, stats = outputs
        loss, acc = self.criterion(logits, batch["labels"])
        return loss, {}, {"acc": acc, **stats}

    def after_step(self, terms: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EpisodeObjective(PretrainObjective):
    """Meta-training: an N-way K-shot episode, queries classified against the support set."""

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["support"], batch["support_labels"], batch["query"], batch["class_ids"])

    def loss(self, outputs: Any, batch: Any, epoch: float) -> tuple[torch.Tensor, dict, dict[str, Any]]:
        logits, stats = outputs
        loss, acc = self.criterion(logits, batch["query_labels"])
        return loss, {}, {"acc": acc, **stats}


class FewShotEvaluator:
    """Validation: fixed-seed episodes of ``FEWSHOT.VAL_SPLIT`` at ``FEWSHOT.K_SHOT``; the score is the accuracy."""

    def __init__(self, cfg: CN, data: Any, device: torch.device, amp: AmpPolicy, stage: str) -> None:
        self.cfg, self.data, self.device, self.amp = cfg, data, device, amp
        self.prefix = f"val_{stage}"

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        fs = self.cfg.FEWSHOT
        val = evaluate_split(self.cfg, model, self.data, fs.VAL_SPLIT, self.device, shots=[fs.K_SHOT],
                             n_episodes=fs.VAL_EPISODES, amp=self.amp)
        return next(iter(val.values()))

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in results.items() if isinstance(v, float)}

    def score(self, results: dict[str, Any]) -> float:
        return float(results["acc"])

    def lines(self, results: dict[str, Any]) -> list[str]:
        return [f"val {results['n_way']}-way {results['k_shot']}-shot {100 * results['acc']:.2f} "
                f"+- {100 * results['ci95']:.2f} %"]


def build_stage(name: str, cfg: CN, model: torch.nn.Module, data: Any, device: torch.device, amp: AmpPolicy) -> Stage:
    """The ``pretrain`` (batches over the training classes) or ``meta`` (episodes) stage."""
    fs, s = cfg.FEWSHOT, cfg.SOLVER
    loader = fewshot_train_loader(cfg, data.splits[fs.TRAIN_SPLIT], data.arrays, name)
    criterion = ClassificationCriterion()
    if name == "pretrain":
        epochs, base_lr, objective = fs.PRETRAIN.EPOCHS, fs.PRETRAIN.BASE_LR, PretrainObjective(criterion, device)
    else:
        epochs, base_lr, objective = s.MAX_EPOCHS, s.BASE_LR, EpisodeObjective(criterion, device)
    optimizer = build_model_optimizer(cfg, unwrap(model), base_lr)
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


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def load_fewshot_data(cfg: CN) -> Any:
    """Parse ``DATASETS.NAMES`` under ``DATASETS.ROOT_DIR`` and check it against ``FEWSHOT``."""
    name = cfg.DATASETS.NAMES
    if name not in datasets.FEWSHOT_DATASETS:
        raise ConfigError(f"DATASETS.NAMES '{name}' is not a few-shot dataset ({', '.join(datasets.FEWSHOT_DATASETS)})")
    data = datasets.build_dataset(name, cfg.DATASETS.ROOT_DIR, verbose=True)
    fs = cfg.FEWSHOT
    for split in (fs.TRAIN_SPLIT, fs.VAL_SPLIT, fs.TEST_SPLIT):
        if split not in data.splits:
            raise ConfigError(f"FEWSHOT: {name} has no split '{split}' (has {', '.join(data.splits)})")
    train_classes = {lab for _, lab in data.splits[fs.TRAIN_SPLIT]}
    if max(train_classes) >= cfg.MODEL.NUM_CLASSES:
        raise ConfigError(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {name}'s '{fs.TRAIN_SPLIT}' split "
                         f"has class ids up to {max(train_classes)} ({len(train_classes)} classes); set it to "
                         f"{max(train_classes) + 1}")
    if "meta" in fs.STAGES:
        check_episodes(data, fs.TRAIN_SPLIT, fs.N_WAY, fs.K_SHOT, fs.N_QUERY, "FEWSHOT.N_WAY", "FEWSHOT.K_SHOT + N_QUERY")
    check_episodes(data, fs.VAL_SPLIT, fs.TEST_WAY, fs.K_SHOT, fs.TEST_QUERY, "FEWSHOT.TEST_WAY",
                   "FEWSHOT.K_SHOT + TEST_QUERY (validation)")
    check_episodes(data, fs.TEST_SPLIT, fs.TEST_WAY, max(fs.TEST_SHOTS), fs.TEST_QUERY, "FEWSHOT.TEST_WAY",
                   "max(FEWSHOT.TEST_SHOTS) + TEST_QUERY")
    return data


def check_episodes(data: Any, split: str, n_way: int, k_shot: int, n_query: int, way_key: str, size_key: str) -> None:
    """Refuse, before any training, episodes that ``split`` cannot give (the episode sampler draws from every
    class): ``n_way`` classes, each with ``k_shot + n_query`` images."""
    counts = Counter(label for _, label in data.splits[split])
    need = k_shot + n_query
    if n_way > len(counts):
        raise ConfigError(f"{way_key} is {n_way} but the '{split}' split has {len(counts)} classes; use at most "
                          f"{len(counts)}")
    small = [c for c, n in counts.items() if n < need]
    if small:
        smallest = min(counts.values())
        raise ConfigError(f"{size_key} = {need} images per class, but {len(small)} of the '{split}' split's "
                          f"{len(counts)} classes have fewer (smallest: {smallest}); lower them to at most {smallest}")


def install_anchors(cfg: CN, model: torch.nn.Module, data: Any, device: torch.device) -> None:
    """Give SAP's anchors what they need from the data set's class names.

    ``text``: encode every class name once (disk cache) with the CLIP text tower; ``words``:
    the word vocabulary of the training classes' names. Other modes need nothing.
    """
    anchors = getattr(unwrap(model), "anchors", None)
    if anchors is None:
        return
    s = cfg.MODEL.SAP
    if anchors.mode == "text":
        emb = encode_class_names(data.class_names, s.CLIP_MODEL, cfg.MODEL.CLIP_WEIGHTS, s.PROMPT_TEMPLATE,
                                 s.ANCHOR_CACHE_DIR, activation=cfg.MODEL.CLIP_ACTIVATION)
        anchors.set_class_embeddings(emb.to(device))
    elif anchors.mode == "words":
        train_ids = sorted({lab for _, lab in data.splits[cfg.FEWSHOT.TRAIN_SPLIT]})
        vocab = anchors.set_class_words(data.class_names, train_ids)
        covered = int(anchors.class_word_mask.any(1).sum())
        logger.info("SAP word anchors: %d words from %d training class names; %d of %d classes have an anchor",
                    len(vocab), len(train_ids), covered, len(data.class_names))


def stage_epochs(cfg: CN, name: str) -> int:
    """The epochs the config asks of stage ``name``."""
    return cfg.FEWSHOT.PRETRAIN.EPOCHS if name == "pretrain" else cfg.SOLVER.MAX_EPOCHS


def evaluate_only(cfg: CN, model: torch.nn.Module, data: Any, device: torch.device, amp: AmpPolicy,
                  ckpt: Checkpointer, resume_path: Path | None) -> dict[str, Any]:
    """``--eval-only``: test the checkpoint ``--resume`` names, else ``MODEL.WEIGHTS``, else the newest one, and
    write the results and their metrics into a folder of their own, ``OUTPUT_DIR/eval`` (``eval-2`` ... when
    taken), so a run's own files stay as they were."""
    weights = eval_weights(ckpt, resume_path, cfg.MODEL.WEIGHTS)
    state = ckpt.load(weights, model=model, restore_rng=False)
    warn_config_differences(state, cfg, weights)
    results = evaluate_split(cfg, model, data, cfg.FEWSHOT.TEST_SPLIT, device, shots=cfg.FEWSHOT.TEST_SHOTS,
                             n_episodes=cfg.FEWSHOT.TEST_EPISODES, amp=amp)
    if not is_main_process():
        return results
    eval_dir = fresh_folder(cfg.OUTPUT_DIR, "eval")
    label = f"{cfg.MODEL.NAME} ({Path(weights).name}) on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}"
    logger.info(write_results(eval_dir, results, label))
    with MetricsLogger.from_config(cfg, output_dir=eval_dir) as metrics:
        metrics.log(_flat_results(results), step=state["step"], prefix="test")
    logger.info("evaluation written to %s", eval_dir)
    return results


def make_plots(cfg: CN, out_dir: Path, metrics: MetricsLogger, step: int) -> Path | None:
    """``sap_stats.png`` from ``metrics.jsonl`` (also sent to W&B); None when disabled or SAP is off."""
    if not cfg.FEWSHOT.PLOT or not (out_dir / "metrics.jsonl").is_file():
        return None
    path = plot_sap_stats(out_dir / "metrics.jsonl", out_dir / SAP_PLOT, cfg.FEWSHOT.N_WAY, cfg.MODEL.SAP.LOGIT_SCALE_MAX)
    if path is not None:
        metrics.log_image("sap_stats", path, step=step)
        logger.info("SAP stats plot: %s", path)
    return path


def _final_sap_state(model: torch.nn.Module) -> dict[str, float]:
    sap = getattr(model, "sap", None)
    if sap is None:
        return {}
    return {"final_logit_scale": float(sap.logit_scale.value()), "final_purify_weight": float(sap.purify_weight.value())}


def _flat_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key, r in results.items():
        out[f"{key}/acc"] = r["acc"]
        out[f"{key}/ci95"] = r["ci95"]
        for stat in ("attn_entropy", "attn_max"):
            if stat in r:
                out[f"{key}/{stat}"] = r[stat]
    return out
