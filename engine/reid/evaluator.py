"""How a ReID model is evaluated: features extracted with the modalities ``TEST.MISS`` leaves, retrieval on
query/gallery for every feature the model offers (CMC, mAP with its bootstrap interval over identities, mINP;
optional re-ranking), and the results as logged and written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.device import AmpPolicy
from engine.evaluation import bootstrap_map_ci, evaluate_reid, evaluate_reid_features, re_ranking
from engine.logger import progress
from engine.prefetch import DevicePrefetcher
from engine.reid.missing import canonical, missing_modalities, present_modalities
from engine.seed import forward_only_kernels
from modeling.layers.half_weights import matmul_weights_in
from utils.io import atomic_write_json
from utils.modalities import MODALITIES

logger = logging.getLogger(__name__)


def _pad_rows(x: Any, rows: int) -> Any:
    """``x`` (a tensor or a dict of them) with its last row repeated up to ``rows`` rows."""
    if isinstance(x, dict):
        return {k: _pad_rows(v, rows) for k, v in x.items()}
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


@torch.no_grad()
@forward_only_kernels()
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

    # the next batch is copied while this one runs; nothing waits for the device until the end. The weights only
    # matmuls read are cast to autocast's dtype once here, not on every batch (the same bits)
    with matmul_weights_in(model, amp.dtype):
        for batch in progress(DevicePrefetcher(loader, to_device, device), desc="extract features"):
            images = dict(batch["images"])
            mask = batch["masks"].clone()  # the batch itself is not changed
            pid, camid, trackid = batch["pids"], batch["camids"], batch["trackids"]
            for col, m in enumerate(MODALITIES):
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


def summary_line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: mAP {100 * r['mAP']:.2f} [95% CI over identities {100 * r['mAP_ci_low']:.2f}, "
            f"{100 * r['mAP_ci_high']:.2f}] | R-1 {100 * r['rank1']:.2f} | R-5 {100 * r['rank5']:.2f} | "
            f"R-10 {100 * r['rank10']:.2f} | mINP {100 * r['mINP']:.2f}")


def scalar_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        prefix = "" if name == "feat" else f"{name}/"
        for key in ("mAP", "mAP_ci_low", "mAP_ci_high", "rank1", "rank5", "rank10", "mINP"):
            out[f"{prefix}{key}"] = float(r[key])
    return out


def write_results(out_dir: Path, results: dict[str, dict[str, Any]], tag: str, extra: dict[str, Any]) -> Path:
    path = out_dir / f"results_{tag}.json"
    atomic_write_json(path, {**extra, "metrics": {k: {kk: (vv.tolist() if hasattr(vv, "tolist") else vv)
                                                       for kk, vv in r.items()} for k, r in results.items()}})
    return path


def missing_record(cfg: CN, miss: str | None = None) -> dict[str, Any]:
    """How a result was evaluated, for the results files: the missing modalities and how they were removed."""
    code = cfg.TEST.MISS if miss is None else miss
    return {"missing_modalities": list(missing_modalities(code)), "miss_mode": cfg.TEST.MISS_MODE}


class ReIDEvaluator:
    """Retrieval on the test split (``results[name]`` per retrieval feature); the score is ``feat``'s mAP."""

    prefix = "test"

    def __init__(self, setup: Any, cfg: CN) -> None:
        """``setup``: a :class:`engine.reid.setup.ReIDSetup` (its ``evaluate`` runs the retrieval)."""
        self.setup, self.cfg = setup, cfg
        self.extracted: dict[str, Any] = {}

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        results, self.extracted = self.setup.evaluate(self.cfg, model=model)
        return results

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        return scalar_metrics(results)

    def score(self, results: dict[str, Any]) -> float:
        return float(results["feat"]["mAP"])

    def lines(self, results: dict[str, Any]) -> list[str]:
        return [summary_line(name, r) for name, r in results.items()]

