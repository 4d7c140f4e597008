"""Multi-modal ReID training and evaluation (DeMo, DeMo-SDTPS): the loop ``train_net.py`` runs.

One function, :func:`run_reid`, reads top to bottom: data, model, objective,
optimizer and schedule, resume, then per step forward -> loss -> backward ->
clip -> guarded step -> log, per epoch checkpoint and evaluation, and at the end
results, figures and ``summary.json`` (written last: it marks the run finished).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from engine.checkpoint import Checkpointer, unwrap
from engine.config import ConfigError
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.evaluation import evaluate_reid, evaluate_reid_features, pairwise_distance, re_ranking
from engine.launch import wrap_ddp
from engine.logger import MetricsLogger, progress
from engine.missing import canonical, missing_modalities, present_modalities
from engine.monitor import NonFiniteGuard, SpikeDetector
from engine.reid_criterion import MODALITY_ORDER, ReIDCriterion
from engine.solver import build_optimizer, build_scheduler
from modeling import MODEL_REGISTRY, build_model
from utils.distributed import barrier, is_main_process
from utils.io import atomic_write_json

logger = logging.getLogger(__name__)


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
    return kwargs


def _num_workers(cfg: CN) -> int | None:
    return None if cfg.DATALOADER.NUM_WORKERS < 0 else cfg.DATALOADER.NUM_WORKERS


def build_reid_model(cfg: CN, num_classes: int, num_cameras: int) -> torch.nn.Module:
    """The configured model with ``num_classes`` identities and ``num_cameras`` SIE rows."""
    model_cfg = cfg.clone()
    model_cfg.defrost()
    model_cfg.MODEL.NUM_CLASSES = num_classes
    model_cfg.MODEL.NUM_CAMERAS = max(num_cameras, 1)
    model_cfg.freeze()
    return build_model(model_cfg)


def build_reid_optimizer(
    cfg: CN, model: torch.nn.Module, criterion: ReIDCriterion
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """Optimizer over the model's groups (backbone at ``SOLVER.BACKBONE_LR``, new modules at
    ``SOLVER.BASE_LR``) and the criterion's own; also returns the flat parameter list to clip."""
    backbone_lr = cfg.SOLVER.BACKBONE_LR if cfg.SOLVER.BACKBONE_LR > 0 else cfg.SOLVER.BASE_LR
    groups = unwrap(model).param_groups(backbone_lr, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY)
    groups += criterion.param_groups(cfg.SOLVER.WEIGHT_DECAY)
    optimizer = build_optimizer(groups, cfg.SOLVER.OPTIMIZER, lr=cfg.SOLVER.BASE_LR,
                                weight_decay=cfg.SOLVER.WEIGHT_DECAY, momentum=cfg.SOLVER.MOMENTUM,
                                nesterov=cfg.SOLVER.NESTEROV)
    return optimizer, [p for g in optimizer.param_groups for p in g["params"]]


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile`` with a ``MODEL.COMPILE`` mode name (``default`` = torch's default mode)."""
    return torch.compile(model, mode=None if mode in ("", "default") else mode)


def resolve_test_modalities(cfg: CN) -> tuple[str, ...]:
    """Modalities present at test time under ``TEST.MISS`` (DeMo's meaning: the letters name the missing)."""
    return present_modalities(cfg.TEST.MISS)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, loader: Any, device: torch.device, amp: AmpPolicy, keep: tuple[str, ...], miss_mode: str
) -> dict[str, Any]:
    """Run ``model`` (eval mode) over ``loader`` with only the ``keep`` modalities; returns features by
    name, ids, cameras, track/scene ids and kept token indices."""
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {}
    keep_idx: dict[str, list[torch.Tensor]] = {}
    pids, camids, trackids = [], [], []
    for images, pid, camid, trackid, mask in progress(loader, desc="extract features"):
        images = {m: x.to(device, non_blocking=True) for m, x in images.items()}
        mask = mask.to(device, non_blocking=True).clone()  # the batch itself is not changed
        for col, m in enumerate(MODALITY_ORDER):
            if m not in keep:
                if miss_mode == "zero":
                    images[m] = torch.zeros_like(images[m])
                else:
                    mask[:, col] = False
        with amp.autocast():
            out = model(images, camid.to(device, non_blocking=True), mask)
        named = {"feat": out["feat"], **out.get("feats", {})}
        for name, value in named.items():
            feats.setdefault(name, []).append(value.float())
        for m, idx in (out.get("keep_indices") or {}).items():
            if idx is not None:
                keep_idx.setdefault(m, []).append(idx.cpu())
        pids.append(pid)
        camids.append(camid)
        trackids.append(torch.as_tensor(trackid))
    return {
        "feats": {k: torch.cat(v) for k, v in feats.items()},
        "pids": torch.cat(pids),
        "camids": torch.cat(camids),
        "trackids": torch.cat(trackids),
        "keep_indices": {k: torch.cat(v) for k, v in keep_idx.items()},
    }


def evaluate(
    model: torch.nn.Module, loader: Any, num_query: int, cfg: CN, device: torch.device, amp: AmpPolicy,
    miss: str | None = None, protocol: str = "camera",
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Metrics for every retrieval feature the model offers; also returns the extracted features.

    ``miss`` is a ``TEST.MISS`` setting (default: the config's): the modalities it names are
    absent, and their own features are not scored. ``protocol`` ``camera`` removes same-id
    same-camera gallery items per query; ``scene`` (MSVR310, as DeMo evaluates it) same-id
    same-scene items.
    """
    code = cfg.TEST.MISS if miss is None else miss
    missing = missing_modalities(code)
    if missing:
        logger.info("evaluating with %s missing (TEST.MISS %s, TEST.MISS_MODE %s)", " + ".join(missing),
                    canonical(code), cfg.TEST.MISS_MODE)
    ext = extract_features(model, loader, device, amp, present_modalities(code), cfg.TEST.MISS_MODE)
    pids = ext["pids"].to(device)
    groups = (ext["trackids"] if protocol == "scene" else ext["camids"]).to(device)
    results: dict[str, dict[str, Any]] = {}
    for name, feat in ext["feats"].items():
        if name in missing:  # a modality's own feature is not a result when that modality is absent
            continue
        if cfg.TEST.FEAT_NORM:
            feat = torch.nn.functional.normalize(feat, dim=1)
        qf, gf = feat[:num_query], feat[num_query:]
        args = (pids[:num_query], pids[num_query:], groups[:num_query], groups[num_query:])
        if cfg.TEST.RE_RANKING:
            results[name] = evaluate_reid(re_ranking(qf, gf), *args, max_rank=cfg.TEST.MAX_RANK)
        else:
            results[name] = evaluate_reid_features(qf, gf, *args, metric=cfg.TEST.METRIC, max_rank=cfg.TEST.MAX_RANK)
    return results, ext


def _summary_line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: mAP {100 * r['mAP']:.2f} | R-1 {100 * r['rank1']:.2f} | R-5 {100 * r['rank5']:.2f} | "
            f"R-10 {100 * r['rank10']:.2f} | mINP {100 * r['mINP']:.2f}")


def _scalar_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        prefix = "" if name == "feat" else f"{name}/"
        for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
            out[f"{prefix}{key}"] = float(r[key])
    return out


def _write_results(out_dir: Path, results: dict[str, dict[str, Any]], tag: str, extra: dict[str, Any]) -> Path:
    path = out_dir / f"results_{tag}.json"
    atomic_write_json(path, {**extra, "metrics": {k: {kk: (vv.tolist() if hasattr(vv, "tolist") else vv)
                                                       for kk, vv in r.items()} for k, r in results.items()}})
    return path


def _resolve_resume(args: argparse.Namespace, ckpt: Checkpointer, cfg: CN) -> Path | None:
    if args.resume == "auto":
        latest = ckpt.latest()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.OUTPUT_DIR} (no 'last_checkpoint' file)")
        return latest
    if args.resume:
        return Path(args.resume)
    return None


def _to_device(batch: tuple, device: torch.device) -> tuple:
    images, pids, camids, masks = batch
    return (
        {k: x.to(device, non_blocking=True) for k, x in images.items()},
        pids.to(device, non_blocking=True),
        camids.to(device, non_blocking=True),
        masks.to(device, non_blocking=True),
    )


def train_step(
    model: torch.nn.Module,
    criterion: ReIDCriterion,
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    params: list[torch.nn.Parameter],
    batch: tuple,
    epoch: float,
    grad_clip: float,
    guard: NonFiniteGuard,
    spikes: SpikeDetector,
) -> tuple[float, dict[str, float], float, dict[str, Any]]:
    """One optimisation step on a device batch ``(images, pids, camids, masks)``.

    Forward under autocast, losses in fp32, backward through the grad scaler, clip,
    then the step's single host sync (loss, grad norm and every term in one
    transfer) decides whether the step is applied: a non-finite step is skipped
    and counted. Returns ``(loss, terms, grad_norm, outputs)`` with host floats.
    """
    images, pids, camids, masks = batch
    torch.compiler.cudagraph_mark_step_begin()  # new iteration for CUDA graphs (MODEL.COMPILE reduce-overhead)
    with amp.autocast():
        outputs = model(images, camids, masks)
    loss, terms = criterion(outputs, pids, masks, epoch)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    amp.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    host = torch.stack([loss.detach(), grad_norm.float(), *terms.values()]).float().tolist()
    term_values = dict(zip(terms, host[2:]))
    if guard.check(term_values, None if amp.scaler.is_enabled() else host[1]):
        amp.scaler.step(optimizer)
        spikes.update(host[0])
    amp.scaler.update()
    criterion.observe_sdm(term_values)
    return host[0], term_values, host[1], outputs


@dataclass
class ReIDSetup:
    """What training and evaluation share: the data, the test loader and the model on its device."""

    data: Any
    test_loader: Any
    num_query: int
    model: torch.nn.Module
    device: torch.device
    amp: AmpPolicy

    def evaluate(self, cfg: CN, miss: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """:func:`evaluate` of the model on the test split under ``TEST.MISS`` ``miss`` (default: the config's)."""
        return evaluate(self.model, self.test_loader, self.num_query, cfg, self.device, self.amp, miss=miss,
                        protocol=self.data.eval_protocol)


def build_reid_setup(cfg: CN) -> ReIDSetup:
    """Parse the data set, build the test loader and the model (``MODEL.PRETRAIN_PATH`` loaded) on the device."""
    check_names(cfg, datasets.REID_DATASETS)
    device = resolve_device(cfg.DEVICE.NAME)
    amp = build_amp_policy(cfg.DEVICE.PRECISION, device)
    data = datasets.build_dataset(
        cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, allow_missing_modality=cfg.DATASETS.ALLOW_MISSING_MODALITY,
        skip_corrupt=cfg.DATASETS.SKIP_CORRUPT, verify_images=cfg.DATASETS.VERIFY_IMAGES, **synthetic_kwargs(cfg),
    )
    test_loader = datasets.build_reid_test_loader(
        data.query + data.gallery, batch_size=cfg.TEST.IMS_PER_BATCH, size=cfg.INPUT.SIZE_TEST,
        mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD, skip_corrupt=cfg.DATASETS.SKIP_CORRUPT,
        num_workers=_num_workers(cfg),
    )
    model = build_reid_model(cfg, data.num_train_pids, data.num_train_cams).to(device)
    return ReIDSetup(data, test_loader, len(data.query), model, device, amp)


def eval_weights(cfg: CN, ckpt: Checkpointer, resume_path: Path | None) -> Path:
    """The checkpoint ``--eval-only`` evaluates: ``--resume PATH``, else ``MODEL.WEIGHTS``, else the run's newest."""
    weights = resume_path or (Path(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ckpt.latest())
    if weights is None:
        raise FileNotFoundError("--eval-only needs --resume PATH, MODEL.WEIGHTS, or a checkpoint in OUTPUT_DIR")
    return weights


def missing_record(cfg: CN, miss: str | None = None) -> dict[str, Any]:
    """How a result was evaluated, for the results files: the missing modalities and how they were removed."""
    code = cfg.TEST.MISS if miss is None else miss
    return {"missing_modalities": list(missing_modalities(code)), "miss_mode": cfg.TEST.MISS_MODE}


def run_reid(cfg: CN, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval-only`` evaluate) the configured ReID model; returns the final metrics."""
    out_dir = Path(cfg.OUTPUT_DIR)
    setup = build_reid_setup(cfg)
    data, test_loader, num_query, model, device, amp = (
        setup.data, setup.test_loader, setup.num_query, setup.model, setup.device, setup.amp)
    criterion = ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None)).to(device)
    ckpt = Checkpointer(out_dir)
    metrics = MetricsLogger(
        out_dir, cfg.WANDB.MODE, config=_cfg_to_dict(cfg), project=cfg.WANDB.PROJECT, entity=cfg.WANDB.ENTITY,
        name=cfg.WANDB.NAME, group=cfg.WANDB.GROUP, tags=cfg.WANDB.TAGS, init_timeout=cfg.WANDB.INIT_TIMEOUT,
    )
    resume_path = _resolve_resume(args, ckpt, cfg)

    if args.eval_only:
        weights = eval_weights(cfg, ckpt, resume_path)
        state = ckpt.load(weights, model=model, restore_rng=False)
        results, ext = setup.evaluate(cfg)
        for name, r in results.items():
            logger.info(_summary_line(name, r))
        tag = "eval_all" if not missing_modalities(cfg.TEST.MISS) else f"eval_miss_{canonical(cfg.TEST.MISS)}"
        _write_results(out_dir, results, tag, {"checkpoint": str(weights), "epoch": state["epoch"],
                                               **missing_record(cfg)})
        _make_figures(out_dir, data, ext, num_query, cfg, model)
        metrics.log(_scalar_metrics(results), step=state["step"], prefix="test")
        metrics.close()
        return results

    # ---- optimisation
    train_loader = datasets.build_reid_train_loader(
        data.train, batch_size=cfg.SOLVER.IMS_PER_BATCH, num_instance=cfg.DATALOADER.NUM_INSTANCE,
        size=cfg.INPUT.SIZE_TRAIN, flip_prob=cfg.INPUT.PROB, padding=cfg.INPUT.PADDING, re_prob=cfg.INPUT.RE_PROB,
        mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD, skip_corrupt=cfg.DATASETS.SKIP_CORRUPT,
        seed=cfg.SEED, num_workers=_num_workers(cfg), prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR,
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the train split gives no P x K batch of {cfg.SOLVER.IMS_PER_BATCH}; lower SOLVER.IMS_PER_BATCH")
    optimizer, params = build_reid_optimizer(cfg, model, criterion)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    m = cfg.MONITOR
    spikes = SpikeDetector(m.SPIKE_WINDOW, m.SPIKE_WARMUP, m.SPIKE_MAD_FLOOR, m.SPIKE_REL_FLOOR, m.SPIKE_SIGMAS)
    guard = NonFiniteGuard(m.MAX_NONFINITE_STEPS)
    start_epoch, step, best = 0, 0, {"mAP": -1.0, "epoch": -1}
    if resume_path is None and cfg.MODEL.WEIGHTS:  # fine-tune: start from these weights, a fresh schedule
        ckpt.load(Path(cfg.MODEL.WEIGHTS), model=model, restore_rng=False)
        logger.info("starting from the weights of %s (MODEL.WEIGHTS)", cfg.MODEL.WEIGHTS)
    if resume_path is not None:
        state = ckpt.load(resume_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=amp.scaler)
        start_epoch, step = state["epoch"], state["step"]
        extra = state["extra"]
        criterion.load_state(extra["criterion"])
        spikes.load_state_dict(extra["spikes"])
        guard.load_state_dict(extra["guard"])
        best = extra["best"]
    train_model = wrap_ddp(model, device)
    if cfg.MODEL.COMPILE:
        train_model = compile_model(train_model, cfg.MODEL.COMPILE)

    def checkpoint_extra() -> dict[str, Any]:
        return {"criterion": criterion.state(), "spikes": spikes.state_dict(), "guard": guard.state_dict(),
                "best": best}

    max_epochs = cfg.SOLVER.MAX_EPOCHS
    for epoch in range(start_epoch, max_epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        train_model.train()
        for it, (images, pids, camids, _, masks) in enumerate(
            progress(train_loader, desc=f"epoch {epoch + 1}/{max_epochs}", total=steps_per_epoch)
        ):
            batch = _to_device((images, pids, camids, masks), device)
            loss_value, term_values, grad_norm, outputs = train_step(
                train_model, criterion, optimizer, amp, params, batch, epoch + it / steps_per_epoch,
                cfg.SOLVER.GRAD_CLIP, guard, spikes,
            )
            scheduler.step()
            step += 1
            if step % cfg.SOLVER.LOG_PERIOD == 0 or it == steps_per_epoch - 1:
                stats = {f"loss/{k}": v for k, v in term_values.items()}
                stats.update({"loss/total": loss_value, "grad_norm": grad_norm, "epoch": epoch + it / steps_per_epoch,
                              "sdm_temperature": criterion.sdm_temperature.value()})
                stats.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
                stats.update({f"model/{k}": v for k, v in outputs.get("stats", {}).items()})
                stats.update({f"monitor/{k}": v for k, v in {**spikes.stats(), **guard.stats()}.items()})
                metrics.log(stats, step=step, prefix="train")
        last = epoch + 1 == max_epochs
        if (epoch + 1) % cfg.SOLVER.EVAL_PERIOD == 0 and not last:  # the last epoch is evaluated below
            if is_main_process():
                best = _evaluate_and_track(model, test_loader, num_query, cfg, device, amp, metrics, ckpt, best,
                                           epoch + 1, step, data.eval_protocol)[2]
            barrier()
        if (epoch + 1) % cfg.SOLVER.CHECKPOINT_PERIOD == 0 or last:
            ckpt.save(f"epoch{epoch + 1:04d}", model=model, optimizer=optimizer, scheduler=scheduler,
                      scaler=amp.scaler, epoch=epoch + 1, step=step, extra=checkpoint_extra())

    results: dict[str, dict[str, Any]] = {}
    if is_main_process():
        results, ext, best = _evaluate_and_track(model, test_loader, num_query, cfg, device, amp, metrics, ckpt,
                                                 best, max_epochs, step, data.eval_protocol)
        _write_results(out_dir, results, "final", {"epochs": max_epochs, "best": best, **missing_record(cfg)})
        _make_figures(out_dir, data, ext, num_query, cfg, unwrap(model))
        summary = {**_scalar_metrics(results), "best_mAP": best["mAP"], "best_epoch": best["epoch"],
                   "steps": step, "stability": spikes.stability, "skipped_steps": float(guard.skipped)}
        metrics.summary(summary)  # written last: marks the run as finished
    metrics.close()
    return results


def _evaluate_and_track(
    model: torch.nn.Module, loader: Any, num_query: int, cfg: CN, device: torch.device, amp: AmpPolicy,
    metrics: MetricsLogger, ckpt: Checkpointer, best: dict[str, Any], epoch: int, step: int, protocol: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Evaluate, log, and save ``checkpoint_best.pth`` when the main feature's mAP improved."""
    results, ext = evaluate(unwrap(model), loader, num_query, cfg, device, amp, protocol=protocol)
    for name, r in results.items():
        logger.info("epoch %d %s", epoch, _summary_line(name, r))
    metrics.log(_scalar_metrics(results), step=step, prefix="test")
    if results["feat"]["mAP"] > best["mAP"]:
        best = {"mAP": float(results["feat"]["mAP"]), "epoch": epoch}
        ckpt.save("best", model=model, epoch=epoch, step=step, extra={"best": best}, periodic=False,
                  resumable=False)
    return results, ext, best


def _make_figures(out_dir: Path, data: Any, ext: dict[str, Any], num_query: int, cfg: CN, model: Any) -> None:
    """Top-10 retrievals and kept-token maps as PNGs in the run folder (rank 0)."""
    from engine.reid_vis import plot_kept_tokens, plot_top10

    feat = ext["feats"]["feat"]
    if cfg.TEST.FEAT_NORM:
        feat = torch.nn.functional.normalize(feat, dim=1)
    dist = pairwise_distance(feat[:num_query], feat[num_query:], cfg.TEST.METRIC).cpu()
    items = data.query + data.gallery
    plot_top10(dist, items[:num_query], items[num_query:], out_dir / "top10_retrievals.png",
               num_queries=cfg.TEST.VIS_QUERIES, seed=cfg.SEED)
    if ext["keep_indices"]:
        grid = getattr(model, "patch_grid", None)
        if grid is not None:
            plot_kept_tokens(items[:num_query], ext["keep_indices"], grid, out_dir / "kept_tokens.png",
                             size=cfg.INPUT.SIZE_TEST, num_queries=cfg.TEST.VIS_QUERIES, seed=cfg.SEED)


def _cfg_to_dict(cfg: CN) -> dict[str, Any]:
    def convert(node: Any) -> Any:
        if isinstance(node, CN):
            return {k: convert(v) for k, v in node.items()}
        return node

    return convert(cfg)
