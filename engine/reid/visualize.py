"""Figures for a ReID run: top-10 retrievals per query, and which patches SDTPS kept per modality."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from yacs.config import CfgNode as CN

from engine.evaluation import pairwise_distance
from utils.modalities import MODALITIES


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(paths: Mapping[str, str], modality: str, size: tuple[int, int]) -> np.ndarray:
    """The image of ``modality`` (H, W, 3) uint8 resized to ``size`` (H, W); grey if missing."""
    path = paths.get(modality)
    if path is None or not Path(path).is_file():
        return np.full((*size, 3), 127, dtype=np.uint8)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0])))


def _pick(n_total: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def _save(fig: Any, path: Path) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80, bbox_inches="tight"))
    _pyplot().close(fig)


def plot_top10(
    dist: torch.Tensor,
    query: Sequence[tuple],
    gallery: Sequence[tuple],
    path: str | Path,
    num_queries: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
) -> Path:
    """For a few queries, the RGB query image and its 10 nearest gallery images (green = same id).

    ``dist`` is (Q, G); ``query``/``gallery`` are the dataset items ``(paths, pid, camid, trackid)``.
    Same-id same-camera gallery entries are skipped as the protocol does.
    """
    plt = _pyplot()
    rows = _pick(len(query), num_queries, seed)
    fig, axes = plt.subplots(len(rows), 11, figsize=(11 * 1.1, len(rows) * 2.2), squeeze=False)
    g_pids = np.array([g[1] for g in gallery])
    g_cams = np.array([g[2] for g in gallery])
    for r, qi in enumerate(rows):
        q_paths, q_pid, q_cam, _ = query[qi]
        order = torch.argsort(dist[qi], stable=True).numpy()
        order = [g for g in order if not (g_pids[g] == q_pid and g_cams[g] == q_cam)][:10]
        axes[r, 0].imshow(_load(q_paths, "RGB", size))
        axes[r, 0].set_title(f"query id {q_pid}", fontsize=7)
        for c, gi in enumerate(order, start=1):
            ax = axes[r, c]
            ax.imshow(_load(gallery[gi][0], "RGB", size))
            ok = g_pids[gi] == q_pid
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if ok else "red")
                spine.set_linewidth(3)
            ax.set_title(f"{c}: id {g_pids[gi]}", fontsize=7, color="green" if ok else "red")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("top-10 retrievals (green: same identity)", fontsize=9)
    _save(fig, Path(path))
    return Path(path)


def plot_kept_tokens(
    items: Sequence[tuple],
    keep_indices: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    path: str | Path,
    size: Sequence[int] = (256, 128),
    num_queries: int = 4,
    seed: int = 0,
) -> Path:
    """Each modality image with the patches SDTPS dropped darkened (kept ones at full brightness).

    ``keep_indices[m]`` is (N_items, K) patch indices into the ``grid`` (rows, cols) patch grid,
    aligned with ``items``.
    """
    plt = _pyplot()
    gh, gw = grid
    h, w = int(size[0]), int(size[1])
    rows = _pick(len(items), num_queries, seed)
    mods = [m for m in MODALITIES if m in keep_indices]
    fig, axes = plt.subplots(len(rows), len(mods), figsize=(len(mods) * 1.6, len(rows) * 2.6), squeeze=False)
    for r, i in enumerate(rows):
        for c, m in enumerate(mods):
            img = _load(items[i][0], m, (h, w)).astype(np.float32)
            kept = np.zeros(gh * gw, dtype=bool)
            kept[keep_indices[m][i].numpy()] = True
            mask = np.kron(kept.reshape(gh, gw), np.ones((h // gh, w // gw)))
            shade = 0.25 + 0.75 * mask[..., None]
            axes[r, c].imshow((img * shade).astype(np.uint8))
            axes[r, c].set_title(f"{m}: kept {kept.sum()}/{kept.size}", fontsize=7)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    fig.suptitle("SDTPS kept patches (dark: merged into the extra token)", fontsize=8)
    _save(fig, Path(path))
    return Path(path)


def make_figures(out_dir: Path, data: Any, ext: dict[str, Any], num_query: int, cfg: CN, model: Any) -> None:
    """Top-10 retrievals and kept-token maps as PNGs in the run folder (rank 0)."""
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
