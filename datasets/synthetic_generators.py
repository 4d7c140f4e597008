"""The two synthetic sets written in the release layouts, and their size presets.

* :func:`generate_rgbnt`: persons (:mod:`datasets.synthetic_person`) in the RGBNT201 layout
  (``train_171/`` and ``test/``, each with ``RGB/``, ``NI/``, ``TI/`` holding the same
  ``<pid:06d>_cam<c>_0_<k:02d>.jpg`` names).
* :func:`generate_fewshot`: shape classes (:mod:`datasets.synthetic_shapes`) in the
  miniImageNet CSV layout (``images/`` + ``train.csv``/``val.csv``/``test.csv`` with
  ``filename,label``).

Both are seeded and deterministic: the same arguments give byte-identical files, and every
image has its own seed, so the number of worker processes does not matter. Folders are
written through :func:`datasets.synthetic_folder.write_atomically`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datasets.synthetic_folder import write_atomically
from datasets.synthetic_person import draw_camera, draw_identity, render_person
from datasets.synthetic_shapes import class_label, fewshot_classes, render_fewshot

#: Recorded in every marker; bumped when the drawn images change, so the generators rewrite older folders.
GENERATOR_VERSION = 1
JPEG_QUALITY = 92

#: Generator arguments by preset name (``--preset``, ``DATASETS.SYNTHETIC.PRESET``); ``size`` is (H, W).
RGBNT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(num_train_ids=40, num_test_ids=20, num_cams=4, images_per_id_cam=4, size=(128, 64)),
    "gpu": dict(num_train_ids=300, num_test_ids=100, num_cams=4, images_per_id_cam=6, size=(256, 128)),
    # GPU ablation tables: many short runs side by side, so small images (cheap to decode); 200 test
    # identities so that which identities are in the test split is not what the tables measure
    "ablation": dict(num_train_ids=100, num_test_ids=200, num_cams=4, images_per_id_cam=4, size=(128, 64)),
    # the tower pretraining (configs/synthetic/Pretrain_tower_small.yml, with another seed): more identities than
    # the ablation set, at its image size
    "pretrain": dict(num_train_ids=500, num_test_ids=100, num_cams=4, images_per_id_cam=4, size=(128, 64)),
}
#: Few-shot generator arguments by preset name; ``num_classes`` is (train, val, test), ``size`` the side.
FEWSHOT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(num_classes=(64, 16, 20), images_per_class=30, size=84),
    "gpu": dict(num_classes=(64, 16, 20), images_per_class=600, size=84),
    # the gpu set with classes harder to tell apart (render_fewshot's clutter): a task that does not saturate
    "gpu_hard": dict(num_classes=(64, 16, 20), images_per_class=600, size=84, clutter=1.0),
}


def _save_jpeg(arr: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image as JPEG at the fixed :data:`JPEG_QUALITY`."""
    Image.fromarray(arr).save(path, format="JPEG", quality=JPEG_QUALITY)


def _run_tasks(fn: Callable[[Any], None], tasks: list[Any], workers: int) -> None:
    """Run ``fn`` on every task, in ``workers`` processes when there is more than one."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(t)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, tasks, chunksize=max(1, len(tasks) // (4 * workers))):
            pass


def default_workers(num_images: int) -> int:
    """Worker processes for generation: one per core, none for small jobs."""
    if num_images < 1000:
        return 1
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _rgbnt_task(task: tuple[str, int, dict[str, Any]]) -> None:
    """Render and write every sighting of one identity (runs in a worker process)."""
    split_dir, pid, cfg = task
    seed, num_cams, per_cam, (H, W), missing_prob = (
        cfg["seed"], cfg["num_cams"], cfg["images_per_id_cam"], cfg["size"], cfg["missing_modality_prob"])
    ident = draw_identity(seed, pid)
    for cam_id in range(num_cams):
        cam = draw_camera(seed, cam_id)
        for k in range(per_cam):
            rng = np.random.default_rng([seed, 13, pid, cam_id, k])
            images = render_person(ident, cam, rng, H, W)
            name = f"{pid:06d}_cam{cam_id + 1}_0_{k:02d}.jpg"
            drop = None
            if missing_prob > 0 and rng.random() < missing_prob:
                drop = ("NI", "TI")[int(rng.integers(2))]
            for mod, arr in zip(("RGB", "NI", "TI"), images):
                if mod != drop:
                    _save_jpeg(arr, Path(split_dir) / mod / name)


def generate_rgbnt(
    out: str | os.PathLike,
    *,
    num_train_ids: int = 40,
    num_test_ids: int = 20,
    num_cams: int = 4,
    images_per_id_cam: int = 4,
    size: tuple[int, int] = (128, 64),
    seed: int = 0,
    missing_modality_prob: float = 0.0,
    workers: int | None = None,
    force: bool = False,
) -> bool:
    """Write a synthetic RGBNT201-layout data set to ``out``; returns False if already up to date.

    Train identities get raw ids ``1..num_train_ids`` (folder ``train_171/``), test identities
    the next ``num_test_ids`` ids (folder ``test/``, used as query and gallery as in
    RGBNT201). Each identity is seen ``images_per_id_cam`` times by each of ``num_cams``
    cameras (``cam1``..``cam<n>``, at most 9: the release grammar has one camera digit).
    ``size`` is (height, width). ``missing_modality_prob`` deletes the NI or TI file of that
    fraction of samples (to exercise ``allow_missing_modality``).
    """
    if not 1 <= num_cams <= 9:
        raise ValueError(f"num_cams must be in 1..9 (RGBNT201 names hold one camera digit), got {num_cams}")
    if num_train_ids < 1 or num_test_ids < 1 or images_per_id_cam < 1:
        raise ValueError("num_train_ids, num_test_ids and images_per_id_cam must be >= 1")
    if num_train_ids + num_test_ids > 999_999:
        raise ValueError("at most 999999 identities fit the six-digit pid field")
    size = (int(size[0]), int(size[1]))
    cfg = dict(
        kind="rgbnt", version=GENERATOR_VERSION, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        num_cams=num_cams, images_per_id_cam=images_per_id_cam, size=list(size), seed=seed,
        missing_modality_prob=missing_modality_prob,
    )
    n_images = 3 * (num_train_ids + num_test_ids) * num_cams * images_per_id_cam
    workers = default_workers(n_images) if workers is None else workers

    def fill(tmp: Path) -> None:
        tasks = []
        for split, pids in (("train_171", range(1, num_train_ids + 1)),
                            ("test", range(num_train_ids + 1, num_train_ids + num_test_ids + 1))):
            for mod in ("RGB", "NI", "TI"):
                (tmp / split / mod).mkdir(parents=True)
            tasks += [(str(tmp / split), pid, dict(cfg, size=size)) for pid in pids]
        _run_tasks(_rgbnt_task, tasks, workers)

    return write_atomically(Path(out), cfg, fill, force=force)


def _fewshot_task(task: tuple[str, int, tuple[str, str, str], int, int, int, float]) -> None:
    """Render and write the ``n`` images of one class (runs in a worker process)."""
    images_dir, cls_index, cls, n, size, seed, clutter = task
    for i in range(n):
        rng = np.random.default_rng([seed, 22, cls_index, i])
        _save_jpeg(render_fewshot(cls, rng, size, clutter), Path(images_dir) / f"{class_label(cls)}_{i:05d}.jpg")


def generate_fewshot(
    out: str | os.PathLike,
    *,
    num_classes: tuple[int, int, int] = (64, 16, 20),
    images_per_class: int = 30,
    size: int = 84,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    clutter: float = 0.0,
) -> bool:
    """Write a synthetic few-shot set in the miniImageNet CSV layout; False if already up to date.

    ``out/images/<label>_<i:05d>.jpg`` and ``out/{train,val,test}.csv`` with header
    ``filename,label``; the label is the readable class name with ``_`` for spaces
    (``red_striped_triangle``), which the miniImageNet loader turns back into the name.
    """
    num_classes = tuple(int(c) for c in num_classes)
    if len(num_classes) != 3 or min(num_classes) < 1:
        raise ValueError(f"num_classes must be three positive counts (train, val, test), got {num_classes}")
    if images_per_class < 1:
        raise ValueError("images_per_class must be >= 1")
    cfg = dict(kind="fewshot", version=GENERATOR_VERSION, num_classes=list(num_classes),
               images_per_class=images_per_class, size=int(size), seed=seed)
    if clutter:  # recorded only when used: the sets written before it have the same marker
        cfg["clutter"] = float(clutter)
    classes = fewshot_classes(seed, num_classes)
    workers = default_workers(sum(num_classes) * images_per_class) if workers is None else workers

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        tasks = []
        index = 0
        for split in ("train", "val", "test"):
            rows = ["filename,label"]
            for cls in classes[split]:
                rows += [f"{class_label(cls)}_{i:05d}.jpg,{class_label(cls)}" for i in range(images_per_class)]
                tasks.append((str(tmp / "images"), index, cls, images_per_class, int(size), seed, float(clutter)))
                index += 1
            (tmp / f"{split}.csv").write_text("\n".join(rows) + "\n")
        _run_tasks(_fewshot_task, tasks, workers)

    return write_atomically(Path(out), cfg, fill, force=force)
