"""Readers shared by the few-shot dataset classes: CSV splits, class folders, pickles, class names."""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datasets.bases import ClassIndex, DatasetLayoutError, FewShotData, first_few, verify_items
from datasets.image_io import ArrayStore, load_pickle, make_array_ref

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
WNID = re.compile(r"^n\d{8}$")

#: CIFAR-100 fine label names in label-index order (the public CIFAR-100 meta file, alphabetical).
CIFAR100_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"]

Raw = list[tuple[str, str]]  # (path, class key) before global class ids are assigned


@functools.lru_cache(maxsize=1)
def wordnet_names() -> dict[str, str]:
    """wnid -> class name (first WordNet lemma) for the 1000 ILSVRC-2012 classes (shipped table)."""
    table = Path(__file__).with_name("imagenet_class_names.tsv")
    names: dict[str, str] = {}
    for line in table.read_text().splitlines():
        if line and not line.startswith("#"):
            wnid, lemmas = line.split("\t", 1)
            names[wnid] = lemmas.split(",")[0].strip()
    return names


def readable_name(key: str) -> str:
    """Human-readable class name of a class key.

    WordNet ids (``n01532829``) map to their first lemma (``house finch``); CUB folder names
    (``001.Black_footed_Albatross``) lose the number; underscores become spaces
    (synthetic ``red_striped_triangle`` -> ``red striped triangle``). An unknown wnid stays as is.
    """
    if WNID.match(key):
        return wordnet_names().get(key, key)
    key = re.sub(r"^\d+\.", "", key)
    return key.replace("_", " ").strip()


def list_image_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))


def read_csv_split(csv_file: Path, image_dirs: Sequence[Path]) -> Raw:
    """Rows ``filename,label`` (header required, Ravi & Larochelle) -> ``[(path, label)]``.

    The image is looked up as ``<dir>/<filename>`` then ``<dir>/<label>/<filename>`` for each
    of ``image_dirs``. Missing images raise :class:`DatasetLayoutError` listing the first few.
    """
    with open(csv_file, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DatasetLayoutError(f"{csv_file}: empty split file (expected a 'filename,label' header and rows)")
    header = [h.strip().lower() for h in rows[0]]
    if header[:2] != ["filename", "label"]:
        raise DatasetLayoutError(f"{csv_file}: first line must be the header 'filename,label', got {rows[0]}")
    items: Raw = []
    missing: list[str] = []
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        if len(row) < 2:
            raise DatasetLayoutError(f"{csv_file}: malformed row {row} (expected filename,label)")
        name, label = row[0].strip(), row[1].strip()
        for d in image_dirs:
            for cand in (d / name, d / label / name):
                if cand.is_file():
                    items.append((str(cand), label))
                    break
            else:
                continue
            break
        else:
            missing.append(str(image_dirs[0] / name))
    if missing:
        raise DatasetLayoutError(
            f"{csv_file}: {len(missing)} listed image(s) not found under {', '.join(str(d) for d in image_dirs)}: "
            f"{first_few(missing)}"
        )
    if not items:
        raise DatasetLayoutError(f"{csv_file}: the split lists no image")
    return items


def read_class_folders(split_dir: Path) -> Raw:
    """``split_dir/<class>/<image>`` -> ``[(path, class)]`` (classes and files sorted)."""
    classes = sorted(d for d in os.listdir(split_dir) if (split_dir / d).is_dir() and not d.startswith("."))
    items: Raw = []
    for c in classes:
        items += [(str(split_dir / c / n), c) for n in list_image_files(split_dir / c)]
    if not items:
        raise DatasetLayoutError(f"{split_dir}: no class folder with images (expected {split_dir}/<class>/<image>)")
    return items


def array_items(file: Path, labels: Sequence[Any], key_of: Callable[[Any], str]) -> Raw:
    """One ``pkl://file#i`` item per row of an in-memory image array."""
    return [(make_array_ref(str(file), i), key_of(lab)) for i, lab in enumerate(labels)]


def register_pickle_array(arrays: ArrayStore, file: Path, field: str, data: dict | None = None) -> None:
    """Register ``load_pickle(file)[field]`` as the image array of ``file`` (primed with ``data``)."""
    path = str(file)
    arrays.register(path, lambda: load_pickle(path)[field], None if data is None else data[field])


def register_npz_array(arrays: ArrayStore, file: Path, field: str = "images") -> None:
    """Register ``np.load(file)[field]`` (loaded on first use) as the image array of ``file``."""
    path = str(file)
    arrays.register(path, lambda: np.load(path)[field])


def assemble(
    name: str,
    base: Path,
    raw: dict[str, Raw],
    *,
    arrays: ArrayStore | None = None,
    layout: str,
    names: dict[str, str] | None = None,
    verify_images: bool = False,
    skip_corrupt: bool = False,
) -> dict:
    """Assign global class ids split by split (train first) -> keyword arguments of :class:`FewShotData`.

    ``names`` overrides :func:`readable_name` for some class keys.
    """
    arrays = arrays if arrays is not None else ArrayStore()
    index = ClassIndex()
    splits: dict[str, list[tuple[str, int]]] = {}
    for split, items in raw.items():
        if not items:
            raise DatasetLayoutError(f"{name}: split '{split}' under '{base}' holds no image")
        splits[split] = [
            (path, index.id(key, (names or {}).get(key) or readable_name(key))) for path, key in items
        ]
    skipped: list[str] = []
    if verify_images:
        for split in splits:
            splits[split] = verify_items(splits[split], lambda it: [it[0]], arrays, skip_corrupt, skipped)
    return dict(
        name=name, root=str(base), splits=splits, class_names=index.names, class_keys=index.keys,
        arrays=arrays, skipped=skipped, layout=layout,
    )


def log_summary(data: FewShotData, verbose: bool) -> None:
    if verbose:
        logging.getLogger(type(data).__module__).info("\n%s", data.summary())


def missing_layout(name: str, base: Path, layouts: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{name}: no supported layout found in '{base}'. Expected one of:\n{layouts}")
