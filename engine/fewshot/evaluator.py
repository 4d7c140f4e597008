"""The few-shot evaluator: validation and test on fixed-seed N-way K-shot episodes, mean accuracy and its 95%
confidence interval (:class:`FewShotEvaluator` for a stage's validation, :func:`evaluate_split` for the test).

The backbone is run once over every image of the split (eval mode: BatchNorm running
statistics, no dropout / DropBlock, deterministic test transform), so a feature depends only
on its image; the episodes (default 2,000 per shot setting, 5-way, 15 queries per class) are
then drawn by :class:`datasets.samplers.EpisodeSampler` from a fixed seed and scored by the
model's episode head (SAP + scaled cosine to purified prototypes) on those features. This is
exactly the per-episode forward pass, without recomputing each image's features for every
episode it appears in.

Confidence interval, as in the few-shot literature (e.g. FEAT's ``compute_confidence_interval``)::

    mean = sum(acc_i) / n,   std = sqrt(sum((acc_i - mean)^2) / n),   ci95 = 1.96 * std / sqrt(n)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode as CN

from datasets.loader import fewshot_eval_loader
from datasets.samplers import EpisodeSampler
from engine.device import AmpPolicy
from engine.logger import progress
from utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def mean_confidence_interval(accuracies: Sequence[float] | np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """``(mean, ci, std)`` of per-episode accuracies: ``ci = z * std / sqrt(n)``, ``std`` with ddof 0."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0:
        raise ValueError("no episode accuracies to summarise")
    mean = float(acc.mean())
    std = float(acc.std())
    return mean, z * std / math.sqrt(acc.size), std


@torch.no_grad()
def backbone_features(model: torch.nn.Module, loader: Any, device: torch.device, amp: Any = None,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (n, D) float32 on ``device`` and global labels (n,) of a batch loader, in order."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in progress(loader, desc=desc, total=len(loader)):
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            f = model.backbone(batch["images"].to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels).to(device)


@torch.no_grad()
def evaluate_episodes(model: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, *, n_way: int, k_shot: int,
                      n_query: int, n_episodes: int, seed: int, z: float = 1.96, desc: str = "episodes"
                      ) -> dict[str, Any]:
    """Score ``n_episodes`` fixed-seed episodes drawn from features (n, D) with global labels (n,).

    Returns ``{acc, ci95, std, n_episodes, n_way, k_shot, n_query, seed, attn_entropy, attn_max,
    logit_scale}`` (accuracies as fractions; the SAP stats are episode means, when SAP is on).
    """
    was_training = model.training
    model.eval()
    sampler = EpisodeSampler(labels.tolist(), n_way, k_shot, n_query, n_episodes, seed=seed, fixed=True,
                             rank=0, world_size=1)
    per_class, device = k_shot + n_query, feats.device
    support_pos = torch.cat([torch.arange(c * per_class, c * per_class + k_shot) for c in range(n_way)]).to(device)
    query_pos = torch.cat([torch.arange(c * per_class + k_shot, (c + 1) * per_class) for c in range(n_way)]).to(device)
    support_labels = torch.arange(n_way, device=device).repeat_interleave(k_shot)
    query_labels = torch.arange(n_way, device=device).repeat_interleave(n_query)
    # every episode's indices drawn first and copied once; the accuracies and SAP stats stay on the device until
    # the end: the loop waits on the device nowhere (the same arithmetic, episode by episode, as one at a time)
    episodes = torch.as_tensor(list(sampler), dtype=torch.long).to(device)
    accs = torch.empty(n_episodes, dtype=torch.float64, device=device)
    stat_sums: dict[str, torch.Tensor] = {}
    for i in progress(range(n_episodes), desc=desc, total=n_episodes):
        s_idx, q_idx = episodes[i][support_pos], episodes[i][query_pos]
        class_ids = labels[s_idx][::k_shot]
        logits, stats = model.episode_logits(feats[s_idx], support_labels, feats[q_idx], class_ids, n_way=n_way)
        accs[i] = (logits.argmax(-1) == query_labels).double().mean()
        for key in ("attn_entropy", "attn_max", "logit_scale"):
            if key in stats:
                value = torch.as_tensor(stats[key], device=device).double()
                stat_sums[key] = stat_sums[key] + value if key in stat_sums else value
    model.train(was_training)
    accs = accs.cpu()
    mean, ci, std = mean_confidence_interval(accs.numpy(), z)
    out: dict[str, Any] = dict(acc=mean, ci95=ci, std=std, n_episodes=n_episodes, n_way=n_way, k_shot=k_shot,
                               n_query=n_query, seed=seed)
    out.update({k: float(v) / n_episodes for k, v in stat_sums.items()})
    out["episode_acc"] = [round(a, 6) for a in accs.tolist()]  # same episodes in every run: paired comparisons
    return out


def paired_episode_difference(acc_a: Sequence[float], acc_b: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """``(mean, ci)`` of the per-episode difference a - b of two models scored on the *same* episodes."""
    a, b = np.asarray(acc_a, dtype=np.float64), np.asarray(acc_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same episodes, got {a.shape} and {b.shape}")
    mean, ci, _ = mean_confidence_interval(a - b, z)
    return mean, ci


def build_eval_loader(cfg: Any, data: Any, split: str) -> Any:
    """Deterministic (test-transform, unshuffled) batch loader over ``data.splits[split]``."""
    if split not in data.splits:
        raise KeyError(f"split '{split}' not in the dataset (has {sorted(data.splits)})")
    return fewshot_eval_loader(cfg, data.splits[split], data.arrays)


#: anchor modes whose anchors carry a class's meaning without its images (scored zero-shot by evaluate_split)
SEMANTIC_MODES = ("text", "words", "learned")


class NearestAnchor(torch.nn.Module):
    """Episode logits from SAP's semantic anchors alone: cosine of each query's backbone feature to each episode
    class's projected semantic vector (``normalize(P e)``), no support image used (zero-shot). The episodes are
    the 1-shot test episodes, so the rows compare."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def episode_logits(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                       class_ids: torch.Tensor, n_way: int) -> tuple[torch.Tensor, dict[str, Any]]:
        anchors = self.model.anchors
        semantic, _ = anchors.semantic(class_ids.to(query.device))
        names = torch.nn.functional.normalize(anchors.proj(semantic.to(anchors.proj.weight.dtype)).float(), dim=-1)
        return torch.nn.functional.normalize(query.float(), dim=-1) @ names.t(), {}


def evaluate_split(cfg: Any, model: torch.nn.Module, data: Any, split: str, device: torch.device, *,
                   shots: Sequence[int], n_episodes: int, amp: Any = None, zero_shot: bool = True
                   ) -> dict[str, dict[str, Any]]:
    """``{"5way_1shot": {...}, "5way_5shot": {...}}`` on ``split`` (see :func:`evaluate_episodes`); with semantic
    anchors (``text``, ``words``, ``learned``) also ``"5way_zeroshot"``: the 1-shot episodes scored by the
    nearest anchor alone (:class:`NearestAnchor`)."""
    fs = cfg.FEWSHOT
    feats, labels = backbone_features(model, build_eval_loader(cfg, data, split), device, amp, desc=f"{split} features")
    results = {}
    anchors = getattr(model, "anchors", None)
    if zero_shot and anchors is not None and anchors.mode in SEMANTIC_MODES:  # the anchors alone, no support image
        key = f"{fs.TEST_WAY}way_zeroshot"
        results[key] = evaluate_episodes(NearestAnchor(model), feats, labels, n_way=fs.TEST_WAY, k_shot=1,
                                         n_query=fs.TEST_QUERY, n_episodes=n_episodes, seed=fs.EVAL_SEED, z=fs.CI_Z,
                                         desc=f"{split} {key}")
        results[key]["k_shot"] = 0  # the episodes' support image is drawn, not used
    for shot in shots:
        key = f"{fs.TEST_WAY}way_{shot}shot"
        results[key] = evaluate_episodes(model, feats, labels, n_way=fs.TEST_WAY, k_shot=shot, n_query=fs.TEST_QUERY,
                                         n_episodes=n_episodes, seed=fs.EVAL_SEED, z=fs.CI_Z,
                                         desc=f"{split} {key}")
    return results


def format_results(results: dict[str, dict[str, Any]], label: str = "") -> str:
    """One line: ``label: 5-way 1-shot 48.21 +- 0.80 %, 5-way 5-shot ... (2000 episodes, seed 1)``."""
    parts = [f"{r['n_way']}-way {r['k_shot']}-shot {100 * r['acc']:.2f} +- {100 * r['ci95']:.2f} %"
             for r in results.values()]
    first = next(iter(results.values()))
    tail = f" ({first['n_episodes']} episodes of {first['n_query']} queries per class, seed {first['seed']})"
    return (f"{label}: " if label else "") + ", ".join(parts) + tail


def write_results(output_dir: str | Path, results: dict[str, dict[str, Any]], label: str,
                  stem: str = "eval_results") -> str:
    """Write ``<stem>.json`` and a one-line ``<stem>.txt`` atomically; return the line."""
    line = format_results(results, label)
    atomic_write_json(Path(output_dir) / f"{stem}.json", results)
    atomic_write_text(Path(output_dir) / f"{stem}.txt", line + "\n")
    return line


class FewShotEvaluator:
    """Validation: fixed-seed episodes of ``FEWSHOT.VAL_SPLIT`` at ``FEWSHOT.K_SHOT``; the score is the accuracy."""

    def __init__(self, cfg: CN, data: Any, device: torch.device, amp: AmpPolicy, stage: str) -> None:
        self.cfg, self.data, self.device, self.amp = cfg, data, device, amp
        self.prefix = f"val_{stage}"

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        fs = self.cfg.FEWSHOT
        val = evaluate_split(self.cfg, model, self.data, fs.VAL_SPLIT, self.device, shots=[fs.K_SHOT],
                             n_episodes=fs.VAL_EPISODES, amp=self.amp, zero_shot=False)
        return val[f"{fs.TEST_WAY}way_{fs.K_SHOT}shot"]

    def scalars(self, results: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in results.items() if isinstance(v, float)}

    def score(self, results: dict[str, Any]) -> float:
        return float(results["acc"])

    def lines(self, results: dict[str, Any]) -> list[str]:
        return [f"val {results['n_way']}-way {results['k_shot']}-shot {100 * results['acc']:.2f} "
                f"+- {100 * results['ci95']:.2f} %"]

