"""Helpers the ReID dataset classes share: pairing modality folders and relabelling ids."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from datasets.bases import (
    MODALITIES,
    DatasetLayoutError,
    ModalityMismatchError,
    ReIDData,
    ReIDItem,
    first_few,
    verify_items,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted image file names (not paths) directly inside ``folder``."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(extensions) and not n.startswith("."))


def pair_modalities(
    dataset: str,
    folders: Mapping[str, Path],
    allow_missing_modality: bool,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> tuple[list[tuple[str, dict[str, str]]], int]:
    """Match the same file name across modality folders.

    ``folders`` maps modality (``'RGB'``, ``'NI'``, ``'TI'``) to its folder; the RGB folder
    is the anchor, as in the public loaders (they glob RGB and build the NI/TI paths from
    the same name). Returns ``([(name, paths), ...], num_samples_missing_a_modality)``.

    * a name present in NI/TI but not in RGB: :class:`ModalityMismatchError` listing the
      first few (the folders disagree; a renamed or stray file);
    * an RGB name without its NI/TI file: :class:`ModalityMismatchError` naming the
      missing files, unless ``allow_missing_modality``, where the sample is kept and the
      modality left out of ``paths`` (the reader gives a zero image and a False mask bit).
    """
    for mod, folder in folders.items():
        if not folder.is_dir():
            raise DatasetLayoutError(f"{dataset}: modality folder '{folder}' ({mod}) does not exist")
    names = {mod: set(list_images(folder, extensions)) for mod, folder in folders.items()}
    anchor = names["RGB"]
    stray = sorted(
        str(folders[mod] / n) for mod in folders if mod != "RGB" for n in names[mod] - anchor
    )
    if stray:
        raise ModalityMismatchError(
            f"{dataset}: modality folders hold different file names; {len(stray)} file(s) have no RGB "
            f"counterpart in '{folders['RGB']}': {first_few(stray)}"
        )
    missing = sorted(str(folders[mod] / n) for mod in folders if mod != "RGB" for n in anchor - names[mod])
    if missing and not allow_missing_modality:
        raise ModalityMismatchError(
            f"{dataset}: {len(missing)} modality file(s) missing (the RGB image exists): {first_few(missing)}. "
            "Pass allow_missing_modality=True (DATASETS.ALLOW_MISSING_MODALITY True) to keep such samples "
            "with a zero image and a False modality mask."
        )
    pairs = []
    num_incomplete = 0
    for n in sorted(anchor):
        paths = {mod: str(folders[mod] / n) for mod in MODALITIES if mod in folders and n in names[mod]}
        num_incomplete += len(paths) < len(folders)
        pairs.append((n, paths))
    return pairs, num_incomplete


def relabel(items: list[ReIDItem]) -> list[ReIDItem]:
    """Map raw pids to ``0..N-1`` in ascending raw-id order (the train relabelling)."""
    pid2label = {pid: i for i, pid in enumerate(sorted({it[1] for it in items}))}
    return [(paths, pid2label[pid], cam, track) for paths, pid, cam, track in items]


def finish(
    cls_name: str,
    root: Path,
    train: list[ReIDItem],
    query: list[ReIDItem],
    gallery: list[ReIDItem],
    *,
    num_missing: int,
    verify_images: bool,
    skip_corrupt: bool,
) -> dict:
    """Optional full decode of every image, then keyword arguments for :class:`ReIDData`."""
    skipped: list[str] = []
    if verify_images:
        def paths_of(item: ReIDItem) -> list[str]:
            return list(item[0].values())

        shared = gallery is query  # RGBNT201: one test folder serves as query and gallery
        train = verify_items(train, paths_of, None, skip_corrupt, skipped)
        query = verify_items(query, paths_of, None, skip_corrupt, skipped)
        gallery = query if shared else verify_items(gallery, paths_of, None, skip_corrupt, skipped)
    for split, items in (("train", train), ("query", query), ("gallery", gallery)):
        if not items:
            raise DatasetLayoutError(f"{cls_name}: the {split} split under '{root}' holds no image")
    return dict(
        name=cls_name, root=str(root), train=train, query=query, gallery=list(gallery),
        skipped=skipped, num_missing_modalities=num_missing,
    )


def log_summary(data: ReIDData, verbose: bool) -> None:
    if verbose:
        logging.getLogger(type(data).__module__).info("\n%s", data.summary())

