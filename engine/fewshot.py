"""Few-shot training of ExpB1 + SAP: pre-training (batch classification) then episodic meta-training.

``python train_b1_improvement.py --config_file configs/synthetic/ExpB1_SAP.yml`` calls
:func:`main`. The run, top to bottom (:func:`run_fewshot`):

1. data: ``datasets.build_dataset(DATASETS.NAMES, DATASETS.ROOT_DIR)``; SAP text anchors are
   encoded once per class name (cached on disk) when ``MODEL.SAP.ANCHOR_MODE`` is ``text``;
2. for each stage of ``FEWSHOT.STAGES`` (``pretrain``, ``meta``), :func:`train_stage`: SGD from
   ``model.get_parameters()`` (``logit_scale_log`` alone, weight decay 0.0), per-step LR
   schedule with warm-up, AMP policy, gradient clipping over the union of the groups'
   parameters, non-finite step guard and loss-spike detector, metrics every
   ``SOLVER.LOG_PERIOD`` steps (loss, accuracy, lr, grad norm, and the four SAP stats
   ``attn_entropy``, ``attn_max``, ``logit_scale``, ``logit_scale_clipped`` averaged over the
   period), validation episodes every ``SOLVER.EVAL_PERIOD`` epochs, a checkpoint every
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
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

import datasets
from datasets.loader import build_fewshot_loader
from engine.checkpoint import Checkpointer, read_checkpoint, unwrap
from engine.config import ConfigError
from engine.defaults import default_setup
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.fewshot_eval import evaluate_split, write_results
from engine.launch import wrap_ddp
from engine.logger import MetricsLogger, progress
from engine.monitor import NonFiniteGuard, SpikeDetector
from engine.plots import SAP_PLOT, plot_sap_stats
from engine.solver import WarmupScheduler, build_optimizer, build_scheduler
from modeling import build_model
from modeling.module.semantic_anchors import encode_class_names

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
    out_dir = Path(cfg.OUTPUT_DIR)
    if cfg.FEWSHOT.TEST_CHECKPOINT not in ("last", "best"):
        raise ConfigError(f"FEWSHOT.TEST_CHECKPOINT must be 'last' or 'best', got '{cfg.FEWSHOT.TEST_CHECKPOINT}'")
    unknown = [st for st in cfg.FEWSHOT.STAGES if st not in STAGES]
    if unknown or list(cfg.FEWSHOT.STAGES) != sorted(cfg.FEWSHOT.STAGES, key=STAGES.index):
        raise ConfigError(f"FEWSHOT.STAGES must list stages of {list(STAGES)} in that order, got {list(cfg.FEWSHOT.STAGES)}")
    device = resolve_device(cfg.DEVICE.NAME)
    amp = build_amp_policy(cfg.DEVICE.PRECISION, device)

    # ---- data and model
    data = load_fewshot_data(cfg)
    model = build_model(cfg).to(device)
    install_anchors(cfg, model, data, device)
    ckpt = Checkpointer(out_dir)
    metrics = MetricsLogger(
        out_dir, cfg.WANDB.MODE, config=_cfg_to_dict(cfg), project=cfg.WANDB.PROJECT, entity=cfg.WANDB.ENTITY,
        name=cfg.WANDB.NAME, group=cfg.WANDB.GROUP, tags=cfg.WANDB.TAGS, init_timeout=cfg.WANDB.INIT_TIMEOUT,
    )
    try:
        resume_path = resolve_resume(ckpt, resume, cfg)
        if eval_only:
            return evaluate_only(cfg, model, data, device, amp, ckpt, metrics, resume_path)

        run: dict[str, Any] = {"stage": None, "stage_epoch": 0, "global_epoch": 0, "step": 0}
        if resume_path is not None:
            state = ckpt.load(resume_path, model=model)  # model + RNG; optimizer states per stage below
            run.update(state["extra"]["run"])
            logger.info("resuming %s: stage %s, epoch %d of that stage", resume_path, run["stage"], run["stage_epoch"])
        for stage in cfg.FEWSHOT.STAGES:
            train_stage(stage, cfg, model, data, device, amp, ckpt, metrics, run, resume_path)

        # ---- test, plot, summary (last)
        final_model = unwrap(model)
        if cfg.FEWSHOT.TEST_CHECKPOINT == "best" and ckpt.path_for("best").is_file():
            ckpt.load(ckpt.path_for("best"), model=final_model, restore_rng=False)
            logger.info("testing the best validation checkpoint %s", ckpt.path_for("best"))
        results = evaluate_split(cfg, final_model, data, cfg.FEWSHOT.TEST_SPLIT, device,
                                 shots=cfg.FEWSHOT.TEST_SHOTS, n_episodes=cfg.FEWSHOT.TEST_EPISODES, amp=amp)
        line = write_results(out_dir, results, label=f"{cfg.MODEL.NAME} on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}")
        logger.info(line)
        metrics.log(_flat_results(results), step=run["step"], prefix="test")
        plot = make_plots(cfg, out_dir, metrics, run["step"])
        summary = {**_flat_results(results), "steps": run["step"], "epochs": run["global_epoch"],
                   "summary_line": line, "plot": str(plot) if plot else ""}
        summary.update(_final_sap_state(final_model))
        metrics.summary(summary)  # written last: marks the run as finished
        return results
    finally:
        metrics.close()


# ---------------------------------------------------------------------------------------------
# One training stage
# ---------------------------------------------------------------------------------------------
def train_stage(stage: str, cfg: CN, model: torch.nn.Module, data: Any, device: torch.device, amp: AmpPolicy,
                ckpt: Checkpointer, metrics: MetricsLogger, run: dict[str, Any], resume_path: Path | None) -> None:
    """Run (or finish, after a resume) one stage: ``pretrain`` (batches) or ``meta`` (episodes).

    ``run`` holds the counters across stages (``stage``, ``stage_epoch``, ``global_epoch``,
    ``step``) and is updated in place.
    """
    fs = cfg.FEWSHOT
    stage_index, resumed_index = STAGES.index(stage), STAGES.index(run["stage"]) if run["stage"] else -1
    if stage_index < resumed_index:
        return  # finished before the checkpoint we resumed from
    max_epochs = fs.PRETRAIN.EPOCHS if stage == "pretrain" else cfg.SOLVER.MAX_EPOCHS
    start_epoch = run["stage_epoch"] if stage_index == resumed_index else 0
    if max_epochs <= 0 or start_epoch >= max_epochs:
        logger.info("stage %s: nothing to do (%d of %d epochs done)", stage, start_epoch, max_epochs)
        return

    # ---- data
    items = data.splits[fs.TRAIN_SPLIT]
    if stage == "pretrain":
        loader = build_fewshot_loader(items, mode="batch", train=True, arrays=data.arrays,
                                      batch_size=fs.PRETRAIN.BATCH_SIZE, size=fs.IMAGE_SIZE, seed=cfg.SEED,
                                      num_workers=cfg.DATALOADER.NUM_WORKERS)
    else:
        loader = build_fewshot_loader(items, mode="episode", train=True, arrays=data.arrays, n_way=fs.N_WAY,
                                      k_shot=fs.K_SHOT, n_query=fs.N_QUERY, n_episodes=fs.EPISODES_PER_EPOCH,
                                      size=fs.IMAGE_SIZE, seed=cfg.SEED, num_workers=cfg.DATALOADER.NUM_WORKERS)
    steps_per_epoch = len(loader)

    # ---- optimizer from the model's two parameter groups, schedule, monitors
    s = cfg.SOLVER
    base_lr = fs.PRETRAIN.BASE_LR if stage == "pretrain" else s.BASE_LR
    optimizer = build_optimizer(unwrap(model).get_parameters(), s.OPTIMIZER, lr=base_lr, weight_decay=s.WEIGHT_DECAY,
                                momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    if stage == "pretrain":
        scheduler = WarmupScheduler(optimizer, total_steps=max_epochs * steps_per_epoch,
                                    warmup_steps=fs.PRETRAIN.WARMUP_EPOCHS * steps_per_epoch,
                                    warmup_factor=s.WARMUP_FACTOR, mode="cosine", min_factor=s.MIN_LR_FACTOR)
    else:
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # clip over the union of the groups
    m = cfg.MONITOR
    spikes = SpikeDetector(m.SPIKE_WINDOW, m.SPIKE_WARMUP, m.SPIKE_MAD_FLOOR, m.SPIKE_REL_FLOOR, m.SPIKE_SIGMAS)
    guard = NonFiniteGuard(m.MAX_NONFINITE_STEPS)
    best_val = -1.0
    if start_epoch > 0:
        assert resume_path is not None
        state = read_checkpoint(resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and amp.scaler.is_enabled():
            amp.scaler.load_state_dict(state["scaler"])
        extra = state["extra"]
        spikes.load_state_dict(extra["spikes"])
        guard.load_state_dict(extra["guard"])
        best_val = float(extra["best_val"])
    train_model = wrap_ddp(model, device, find_unused_parameters=True)
    prefix = "pretrain" if stage == "pretrain" else "train"
    run["stage"] = stage
    logger.info("stage %s: epochs %d..%d of %d steps, lr %g, %d parameter groups", stage, start_epoch + 1,
                max_epochs, steps_per_epoch, base_lr, len(optimizer.param_groups))

    for epoch in range(start_epoch, max_epochs):
        loader.batch_sampler.set_epoch(epoch)
        train_model.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for it, batch in enumerate(progress(loader, desc=f"{stage} {epoch + 1}/{max_epochs}", total=steps_per_epoch)):
            # ---- forward and loss (fp32 loss under autocast)
            with amp.autocast():
                if stage == "pretrain":
                    images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                    logits, stats = train_model(images)
                else:
                    ep = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    logits, stats = train_model(ep["support"], ep["support_labels"], ep["query"], ep["class_ids"])
                    target = ep["query_labels"]
            loss = F.cross_entropy(logits.float(), target)
            acc = (logits.detach().argmax(-1) == target).float().mean()

            # ---- backward, clip, guarded step
            optimizer.zero_grad(set_to_none=True)
            amp.scaler.scale(loss).backward()
            amp.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.GRAD_CLIP if s.GRAD_CLIP > 0 else math.inf)
            loss_value, grad_value = torch.stack([loss.detach(), grad_norm.float()]).tolist()  # one host sync
            if guard.check({"loss": loss_value}, None if amp.scaler.is_enabled() else grad_value):
                amp.scaler.step(optimizer)
                spikes.update(loss_value)
            amp.scaler.update()
            scheduler.step()
            run["step"] += 1

            # ---- log every LOG_PERIOD steps (stats averaged over the period)
            for key, value in {"loss": loss.detach(), "acc": acc, **stats}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            count += 1
            if run["step"] % s.LOG_PERIOD == 0 or it == steps_per_epoch - 1:
                record = {k: float(v) / count for k, v in sums.items()}
                record.update({"lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_value,
                               "epoch": run["global_epoch"] + (it + 1) / steps_per_epoch})
                record.update({f"monitor/{k}": v for k, v in {**spikes.stats(), **guard.stats()}.items()
                               if math.isfinite(v)})  # no NaN in metrics.jsonl (spike threshold in warm-up)
                metrics.log(record, step=run["step"], prefix=prefix)
                sums, count = {}, 0

        # ---- end of epoch: validate, checkpoint
        run["stage_epoch"], run["global_epoch"] = epoch + 1, run["global_epoch"] + 1
        last = epoch + 1 == max_epochs
        if (epoch + 1) % s.EVAL_PERIOD == 0 or last:
            val = evaluate_split(cfg, unwrap(model), data, fs.VAL_SPLIT, device, shots=[fs.K_SHOT],
                                 n_episodes=fs.VAL_EPISODES, amp=amp)
            res = next(iter(val.values()))
            metrics.log({k: v for k, v in res.items() if isinstance(v, float)}, step=run["step"], prefix=f"val_{stage}")
            logger.info("%s epoch %d: val %d-way %d-shot %.2f +- %.2f %%", stage, epoch + 1, res["n_way"],
                        res["k_shot"], 100 * res["acc"], 100 * res["ci95"])
            if res["acc"] > best_val:
                best_val = res["acc"]
                ckpt.save("best", model=model, epoch=run["global_epoch"], step=run["step"], periodic=False,
                          resumable=False, extra={"run": dict(run), "val": res})
        if (epoch + 1) % s.CHECKPOINT_PERIOD == 0 or last:
            ckpt.save(f"epoch{run['global_epoch']:04d}", model=model, optimizer=optimizer, scheduler=scheduler,
                      scaler=amp.scaler, epoch=run["global_epoch"], step=run["step"],
                      extra={"run": dict(run), "spikes": spikes.state_dict(), "guard": guard.state_dict(),
                             "best_val": best_val})


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
    if max(train_classes) >= fs.NUM_TRAIN_CLASSES:
        raise ConfigError(f"FEWSHOT.NUM_TRAIN_CLASSES is {fs.NUM_TRAIN_CLASSES} but {name}'s '{fs.TRAIN_SPLIT}' split "
                         f"has class ids up to {max(train_classes)} ({len(train_classes)} classes); set it to "
                         f"{max(train_classes) + 1}")
    return data


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


def resolve_resume(ckpt: Checkpointer, resume: str | None, cfg: CN) -> Path | None:
    """``None`` -> None; ``"auto"`` -> newest checkpoint (error if none); else the given path."""
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt.latest()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.OUTPUT_DIR} (no 'last_checkpoint' file)")
        return latest
    return Path(resume)


def evaluate_only(cfg: CN, model: torch.nn.Module, data: Any, device: torch.device, amp: AmpPolicy,
                  ckpt: Checkpointer, metrics: MetricsLogger, resume_path: Path | None) -> dict[str, Any]:
    """``--eval-only``: test the checkpoint ``--resume`` names, else ``MODEL.WEIGHTS``, else the newest one."""
    weights = resume_path or (Path(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ckpt.latest())
    if weights is None:
        raise FileNotFoundError("--eval-only needs --resume PATH, MODEL.WEIGHTS, or a checkpoint in OUTPUT_DIR")
    state = ckpt.load(weights, model=model, restore_rng=False)
    results = evaluate_split(cfg, model, data, cfg.FEWSHOT.TEST_SPLIT, device, shots=cfg.FEWSHOT.TEST_SHOTS,
                             n_episodes=cfg.FEWSHOT.TEST_EPISODES, amp=amp)
    label = f"{cfg.MODEL.NAME} ({Path(weights).name}) on {cfg.DATASETS.NAMES} {cfg.FEWSHOT.TEST_SPLIT}"
    logger.info(write_results(cfg.OUTPUT_DIR, results, label, stem="eval_only_results"))
    metrics.log(_flat_results(results), step=state["step"], prefix="eval_only")
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


def _cfg_to_dict(cfg: CN) -> dict[str, Any]:
    def convert(node: Any) -> Any:
        return {k: convert(v) for k, v in node.items()} if isinstance(node, CN) else node

    return convert(cfg)
