"""Multi-modal ReID (DeMo, DeMo-SDTPS): what ``train_net.py`` runs.

:func:`run_reid` builds the data, the model and its objective, then hands one stage to the
shared :class:`engine.trainer.Trainer`; this module says only what is ReID's own: how a batch
becomes a loss (:class:`ReIDObjective`, around :class:`losses.reid_criterion.ReIDCriterion`),
how a model is evaluated (:class:`ReIDEvaluator`: retrieval on query/gallery, every feature the
model offers, missing modalities per ``TEST.MISS``), and what a finished run writes
(``results_final.json``, the figures, ``summary.json`` last: it marks the run finished).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

import datasets
from engine.checkpoint import (
    Checkpointer,
    eval_weights,
    read_checkpoint,
    resolve_resume,
    unwrap,
    warn_config_differences,
)
from engine.config import ConfigError
from engine.defaults import refuse_finished_resume
from engine.device import AmpPolicy, build_amp_policy, resolve_device
from engine.evaluation import (
    bootstrap_map_ci,
    evaluate_reid,
    evaluate_reid_features,
    pairwise_distance,
    re_ranking,
)
from engine.logger import MetricsLogger, progress
from engine.missing import canonical, missing_modalities, present_modalities
from engine.prefetch import DevicePrefetcher
from engine.solver import build_model_optimizer, build_scheduler, param_rules
from engine.tower_pretrain import ensure_pretrained_tower
from engine.trainer import Stage, Trainer
from losses.reid_criterion import MODALITY_ORDER, ReIDCriterion
from modeling import MODEL_REGISTRY, build_model
from utils.distributed import is_main_process
from utils.io import atomic_write_json, fresh_folder

logger = logging.getLogger(__name__)

STAGE = "train"  # a ReID run has one stage


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


def build_reid_optimizer(cfg: CN, model: torch.nn.Module, criterion: ReIDCriterion) -> torch.optim.Optimizer:
    """The optimizer ``train_net.py`` trains with: the model's groups (backbone at ``SOLVER.BACKBONE_LR``, new
    modules at ``SOLVER.BASE_LR``, biases, 1-D tensors and classifiers by ``SOLVER.BIAS_LR_FACTOR``,
    ``WEIGHT_DECAY_BIAS``, ``DECAY_ALL_TENSORS``, ``LARGE_FC_LR``) and the criterion's own."""
    return build_model_optimizer(cfg, unwrap(model), cfg.SOLVER.BASE_LR, criterion.param_groups(cfg.SOLVER.WEIGHT_DECAY),
                                 rules=param_rules(cfg))


def resolve_test_modalities(cfg: CN) -> tuple[str, ...]:
    """Modalities present at test time under ``TEST.MISS`` (DeMo's meaning: the letters name the missing)."""
    return present_modalities(cfg.TEST.MISS)


def _pad_rows(x: Any, rows: int) -> Any:
    """``x`` (a tensor or a dict of them) with its last row repeated up to ``rows`` rows."""
    if isinstance(x, dict):
        return {k: _pad_rows(v, rows) for k, v in x.items()}
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, loader: Any, device: torch.device, amp: AmpPolicy, keep: tuple[str, ...], miss_mode: str
) -> dict[str, Any]:
    """Run ``model`` (eval mode) over ``loader`` with only the ``keep`` modalities; returns features by
    name, ids, cameras, track/scene ids and kept token indices.

    A compiled model (``torch.compile``) sees one batch shape: a short last batch is padded to the
    loader's batch size with copies of its last sample (dropped from the outputs), so no graph is
    compiled or recorded for it; its outputs are copied before the next batch runs (CUDA graphs reuse
    their output memory).
    """
    model.eval()
    compiled = hasattr(model, "_orig_mod")  # what torch.compile returns
    full = getattr(loader, "batch_size", None) if compiled else None
    feats: dict[str, list[torch.Tensor]] = {}
    keep_idx: dict[str, list[torch.Tensor]] = {}
    pids, camids, trackids = [], [], []

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:  # ids stay on the host
        return {**batch, "images": {m: x.to(device, non_blocking=True) for m, x in batch["images"].items()},
                "masks": batch["masks"].to(device, non_blocking=True),
                "camids_dev": batch["camids"].to(device, non_blocking=True)}

    # the next batch is copied while this one runs; nothing waits for the device until the end
    for batch in progress(DevicePrefetcher(loader, to_device, device), desc="extract features"):
        images = dict(batch["images"])
        mask = batch["masks"].clone()  # the batch itself is not changed
        pid, camid, trackid = batch["pids"], batch["camids"], batch["trackids"]
        for col, m in enumerate(MODALITY_ORDER):
            if m not in keep:
                if miss_mode == "zero":
                    images[m] = torch.zeros_like(images[m])
                else:
                    mask[:, col] = False
        camid_dev, n = batch["camids_dev"], len(pid)
        if full and n < full:
            images, mask, camid_dev = (_pad_rows(x, full) for x in (images, mask, camid_dev))
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with amp.autocast():
            out = model(images, camid_dev, mask)
        named = {"feat": out["feat"], **out.get("feats", {})}
        for name, value in named.items():
            feats.setdefault(name, []).append(value[:n].float().clone() if compiled else value.float())
        for m, idx in (out.get("keep_indices") or {}).items():
            if idx is not None:
                keep_idx.setdefault(m, []).append(idx[:n].clone() if compiled else idx)
        pids.append(pid)
        camids.append(camid)
        trackids.append(torch.as_tensor(trackid))
    return {
        "feats": {k: torch.cat(v) for k, v in feats.items()},
        "pids": torch.cat(pids),
        "camids": torch.cat(camids),
        "trackids": torch.cat(trackids),
        "keep_indices": {k: torch.cat(v).cpu() for k, v in keep_idx.items()},
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
            dist = re_ranking(qf, gf, k1=cfg.TEST.RE_RANKING_K1, k2=cfg.TEST.RE_RANKING_K2,
                              lambda_value=cfg.TEST.RE_RANKING_LAMBDA)
            results[name] = evaluate_reid(dist, *args, max_rank=cfg.TEST.MAX_RANK)
        else:
            results[name] = evaluate_reid_features(qf, gf, *args, metric=cfg.TEST.METRIC, max_rank=cfg.TEST.MAX_RANK)
        r = results[name]
        r["mAP_ci_low"], r["mAP_ci_high"] = bootstrap_map_ci(r.pop("query_ap"), r.pop("query_pid"), seed=cfg.SEED)
    return results, ext


def _summary_line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: mAP {100 * r['mAP']:.2f} [95% CI over identities {100 * r['mAP_ci_low']:.2f}, "
            f"{100 * r['mAP_ci_high']:.2f}] | R-1 {100 * r['rank1']:.2f} | R-5 {100 * r['rank5']:.2f} | "
            f"R-10 {100 * r['rank10']:.2f} | mINP {100 * r['mINP']:.2f}")


def _scalar_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        prefix = "" if name == "feat" else f"{name}/"
        for key in ("mAP", "mAP_ci_low", "mAP_ci_high", "rank1", "rank5", "rank10", "mINP"):
            out[f"{prefix}{key}"] = float(r[key])
    return out


def _write_results(out_dir: Path, results: dict[str, dict[str, Any]], tag: str, extra: dict[str, Any]) -> Path:
    path = out_dir / f"results_{tag}.json"
    atomic_write_json(path, {**extra, "metrics": {k: {kk: (vv.tolist() if hasattr(vv, "tolist") else vv)
                                                       for kk, vv in r.items()} for k, r in results.items()}})
    return path


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
    check_names(cfg, datasets.REID_DATASETS)
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


def missing_record(cfg: CN, miss: str | None = None) -> dict[str, Any]:
    """How a result was evaluated, for the results files: the missing modalities and how they were removed."""
    code = cfg.TEST.MISS if miss is None else miss
    return {"missing_modalities": list(missing_modalities(code)), "miss_mode": cfg.TEST.MISS_MODE}


def _model_stats(outputs: dict[str, Any]) -> dict[str, Any]:
    """The model's own stats of a forward, as logged (``model/<name>``)."""
    return {f"model/{k}": v for k, v in outputs.get("stats", {}).items()}


class ReIDObjective:
    """A ReID training step's loss: the model on the batch's three modalities, then the criterion."""

    def __init__(self, criterion: ReIDCriterion, device: torch.device) -> None:
        self.criterion, self.device = criterion, device

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loader's batch dict on the device (``trackids`` are not used in training and stay)."""
        dev = self.device
        return {"images": {k: x.to(dev, non_blocking=True) for k, x in batch["images"].items()},
                "pids": batch["pids"].to(dev, non_blocking=True), "camids": batch["camids"].to(dev, non_blocking=True),
                "masks": batch["masks"].to(dev, non_blocking=True)}

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return model(batch["images"], batch["camids"], batch["masks"])

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any], epoch: float) -> tuple[
            torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        total, terms = self.criterion(outputs, batch["pids"], batch["masks"], epoch)
        stats = {**_model_stats(outputs), **self.criterion.stats}
        stats["sdm_temperature"] = self.criterion.sdm_temperature.value()
        return total, terms, stats

    def compiled_step(self, mode: str, amp: AmpPolicy) -> Callable[..., tuple] | None:
        """``(model, batch, epoch) -> (total, terms, stats)`` with the forward and the loss compiled as one
        graph (``MODEL.COMPILE_SCOPE step``); ``None`` when the criterion has a term that reads the epoch
        inside (CEM). The SDM temperature enters as a device tensor, so its schedule recompiles nothing."""
        if self.criterion.cem is not None:
            return None
        criterion = self.criterion

        def forward_loss(model: torch.nn.Module, batch: dict[str, Any], temperature: torch.Tensor) -> tuple:
            with amp.autocast():
                outputs = self.forward(model, batch)
            total, terms, stats = criterion.compute(outputs, batch["pids"], batch["masks"], temperature)
            return total, terms, {**_model_stats(outputs), **stats}

        compiled = torch.compile(forward_loss, mode=None if mode in ("", "default") else mode)
        temperature = torch.zeros((), device=self.device)

        def step(model: torch.nn.Module, batch: dict[str, Any], epoch: float) -> tuple:
            tau = criterion.temperature(epoch)
            temperature.fill_(tau)
            total, terms, stats = compiled(model, batch, temperature)
            return total, terms, {**stats, "sdm_temperature": tau}

        return step

    def after_step(self, terms: dict[str, float]) -> None:
        self.criterion.observe_sdm(terms)

    def state_dict(self) -> dict[str, Any]:
        return self.criterion.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.load_state(state)


class ReIDEvaluator:
    """Retrieval on the test split (``results[name]`` per retrieval feature); the score is ``feat``'s mAP."""

    prefix = "test"

    def __init__(self, setup: ReIDSetup, cfg: CN) -> None:
        self.setup, self.cfg = setup, cfg
        self.extracted: dict[str, Any] = {}

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        results, self.extracted = self.setup.evaluate(self.cfg, model=model)
        return results

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        return _scalar_metrics(results)

    def score(self, results: dict[str, Any]) -> float:
        return float(results["feat"]["mAP"])

    def lines(self, results: dict[str, Any]) -> list[str]:
        return [_summary_line(name, r) for name, r in results.items()]


def run_reid(cfg: CN, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval-only`` evaluate) the configured ReID model; returns the final metrics."""
    out_dir = Path(cfg.OUTPUT_DIR)
    ckpt = Checkpointer(out_dir, background=cfg.SOLVER.CHECKPOINT_ASYNC)
    resume_path = resolve_resume(ckpt, args.resume)
    resume = None
    if resume_path is not None and not args.eval_only:
        resume = read_checkpoint(resume_path, out_dir)
        refuse_finished_resume(out_dir, resume, [(STAGE, cfg.SOLVER.MAX_EPOCHS)])
    setup = build_reid_setup(cfg)
    model, device, amp = setup.model, setup.device, setup.amp
    criterion = ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None)).to(device)
    evaluator = ReIDEvaluator(setup, cfg)
    if args.eval_only:
        return evaluate_only(cfg, setup, evaluator, ckpt, resume_path)
    with MetricsLogger.from_config(cfg) as metrics:
        loader = datasets.reid_train_loader(cfg, setup.data.train)
        if loader.batch_sampler.batches_per_epoch == 0:
            raise ValueError(f"the train split gives no P x K batch of {cfg.SOLVER.IMS_PER_BATCH}; "
                             "lower SOLVER.IMS_PER_BATCH")
        optimizer = build_reid_optimizer(cfg, model, criterion)
        scheduler = build_scheduler(cfg, optimizer, loader.batch_sampler.batches_per_epoch)
        if resume is not None:
            Checkpointer.restore_model(resume, resume_path, model)
        elif cfg.MODEL.WEIGHTS:  # fine-tune: start from these weights, a fresh schedule
            ckpt.load(Path(cfg.MODEL.WEIGHTS), model=model, restore_rng=False)
            logger.info("starting from the weights of %s (MODEL.WEIGHTS)", cfg.MODEL.WEIGHTS)
        trainer = Trainer(cfg, model, device, amp, ckpt, metrics, stages=(STAGE,), resume=resume)
        stage = Stage(STAGE, loader, cfg.SOLVER.MAX_EPOCHS, ReIDObjective(criterion, device), optimizer, scheduler,
                      evaluator=evaluator, samples_per_step=cfg.SOLVER.IMS_PER_BATCH)
        fit = trainer.fit(stage)
        if not is_main_process():
            return {}
        results = fit.results if fit.results is not None else evaluator(model)
        best = {"mAP": fit.best["score"], "epoch": fit.best["epoch"]}
        _write_results(out_dir, results, "final", {"epochs": cfg.SOLVER.MAX_EPOCHS, "best": best,
                                                   **missing_record(cfg)})
        _make_figures(out_dir, setup.data, evaluator.extracted, setup.num_query, cfg, unwrap(model))
        summary = {**_scalar_metrics(results), "best_mAP": best["mAP"], "best_epoch": best["epoch"],
                   "steps": trainer.run.step, "stability": trainer.spikes.stability,
                   "skipped_steps": float(trainer.guard.skipped)}
        metrics.summary(summary)  # written last: marks the run as finished
        return results


def evaluate_only(cfg: CN, setup: ReIDSetup, evaluator: ReIDEvaluator, ckpt: Checkpointer,
                  resume_path: Path | None) -> dict[str, Any]:
    """``--eval-only``: evaluate ``--resume PATH``, else ``MODEL.WEIGHTS``, else the run's newest checkpoint, and
    write everything into a folder of its own, ``OUTPUT_DIR/eval_<setting>`` (``eval_all``, ``eval_miss_rn``;
    ``-2``, ``-3`` ... when taken), so a run's own results, figures and metrics stay as they were."""
    out_dir = Path(cfg.OUTPUT_DIR)
    weights = eval_weights(ckpt, resume_path, cfg.MODEL.WEIGHTS)
    state = ckpt.load(weights, model=setup.model, restore_rng=False)
    warn_config_differences(state, cfg, weights)
    tag = "eval_all" if not missing_modalities(cfg.TEST.MISS) else f"eval_miss_{canonical(cfg.TEST.MISS)}"
    if not is_main_process():  # rank 0 writes the evaluation
        return evaluator(setup.model)
    eval_dir = fresh_folder(out_dir, tag)
    with MetricsLogger.from_config(cfg, output_dir=eval_dir) as metrics:
        results = evaluator(setup.model)
        for line in evaluator.lines(results):
            logger.info(line)
        path = _write_results(eval_dir, results, "eval", {"checkpoint": str(weights), "epoch": state["epoch"],
                                                          **missing_record(cfg)})
        _make_figures(eval_dir, setup.data, evaluator.extracted, setup.num_query, cfg, setup.model)
        metrics.log(_scalar_metrics(results), step=state["step"], prefix="test")
    logger.info("evaluation written to %s", path)
    return results


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
