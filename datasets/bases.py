"""Containers every dataset class returns, shared errors, and the summary tables.

ReID datasets return a :class:`ReIDData` (``.train``, ``.query``, ``.gallery`` lists of
``(paths, pid, camid, trackid)``); few-shot datasets return a :class:`FewShotData`
(``.splits[name]`` lists of ``(path, label)`` and ``.class_names``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datasets.image_io import ArrayStore, ImageReadError, read_image
from utils.errors import UserError
from utils.modalities import MODALITIES  # noqa: F401  (importable from here too)

logger = logging.getLogger(__name__)


ReIDItem = tuple[dict[str, str], int, int, int]
FewShotItem = tuple[str, int]


class DatasetLayoutError(FileNotFoundError):
    """A root or split folder is missing or holds something else than the release's layout."""


class ModalityMismatchError(UserError, ValueError):
    """The modality folders of a split do not hold the same file names."""


def first_few(items: Iterable[str], limit: int = 5) -> str:
    """``'a, b, c (and 7 more)'`` for error messages that list offending files."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def resolve_dataset_dir(root: str | os.PathLike, names: Sequence[str], marker: Sequence[str]) -> Path:
    """Find a release's folder: ``root/<one of names>`` or ``root`` itself.

    ``marker`` lists entries (relative paths) whose presence identifies the release
    folder, e.g. ``('train_171', 'test')`` for RGBNT201. Returns the first candidate
    holding any marker entry, else the first existing ``root/<name>``, else ``root``;
    the caller checks the full layout and raises with the expected tree.
    """
    root = Path(root).expanduser()
    candidates = [root / n for n in names] + [root]
    for cand in candidates:
        if any((cand / m).exists() for m in marker):
            return cand
    for cand in candidates:
        if cand.is_dir():
            return cand
    return root / names[0] if names else root


def require_dirs(dataset: str, base: Path, dirs: Sequence[str], layout: str) -> None:
    """Raise :class:`DatasetLayoutError` naming the missing folder and the expected layout."""
    if not base.is_dir():
        raise DatasetLayoutError(f"{dataset}: dataset folder '{base}' does not exist. Expected layout:\n{layout}")
    for d in dirs:
        if not (base / d).is_dir():
            raise DatasetLayoutError(
                f"{dataset}: split folder '{base / d}' does not exist. Expected layout:\n{layout}"
            )


def verify_items(
    items: list,
    paths_of: Callable[[Any], Sequence[str]],
    arrays: ArrayStore | None,
    skip_corrupt: bool,
    skipped: list[str],
) -> list:
    """Decode every image of ``items``; drop (``skip_corrupt``) or raise on unreadable ones.

    ``paths_of(item)`` lists the image paths of one item. Dropped file names are appended
    to ``skipped``.
    """
    kept = []
    for item in items:
        bad = None
        for p in paths_of(item):
            try:
                read_image(p, arrays)
            except ImageReadError as exc:
                bad = exc
                break
        if bad is None:
            kept.append(item)
        elif skip_corrupt:
            skipped.append(str(bad).split(": ", 1)[0])
            logger.warning("skipping unreadable image: %s", bad)
        else:
            raise ImageReadError(f"{bad} (pass skip_corrupt=True / DATASETS.SKIP_CORRUPT True to skip and count)")
    return kept


@dataclass
class ReIDData:
    """A parsed multi-modal ReID release.

    ``train`` ids are relabelled to ``0..num_train_pids-1`` (ascending raw id); ``query``
    and ``gallery`` keep the raw ids. Each item is ``(paths, pid, camid, trackid)`` with
    ``paths`` keyed by modality (``'RGB'``, ``'NI'``, ``'TI'``); a modality missing on disk
    (only with ``allow_missing_modality=True``) is simply absent from ``paths``.
    """

    #: how a query's gallery is filtered: ``camera`` drops same-id same-camera items (RGBNT201,
    #: RGBNT100); ``scene`` drops same-id same-scene items (MSVR310's protocol; the scene is the trackid)
    eval_protocol: ClassVar[str] = "camera"

    name: str
    root: str
    train: list[ReIDItem]
    query: list[ReIDItem]
    gallery: list[ReIDItem]
    skipped: list[str] = field(default_factory=list)
    num_missing_modalities: int = 0

    @staticmethod
    def stats(items: Sequence[ReIDItem]) -> tuple[int, int, int, int]:
        """``(num_ids, num_images, num_cameras, num_tracks)`` of one split."""
        pids = {it[1] for it in items}
        cams = {it[2] for it in items}
        tracks = {it[3] for it in items}
        return len(pids), len(items), len(cams), len(tracks)

    @property
    def num_train_pids(self) -> int:
        return self.stats(self.train)[0]

    @property
    def num_train_cams(self) -> int:
        """Number of distinct train cameras (camera ids are ``0..num_train_cams-1``)."""
        return max((it[2] for it in self.train), default=-1) + 1

    @property
    def num_train_views(self) -> int:
        """Number of distinct track/scene ids in train (1 when every trackid is -1)."""
        return self.stats(self.train)[3]

    def summary(self) -> str:
        """Table of ids / images (multi-modal samples) / cameras per split, like ReID toolkits."""
        lines = [
            f"=> {self.name} loaded from {self.root}",
            "  ----------------------------------------",
            "  subset   | # ids | # images | # cameras",
            "  ----------------------------------------",
        ]
        for split, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            n_ids, n_img, n_cam, _ = self.stats(items)
            lines.append(f"  {split:<8} | {n_ids:5d} | {n_img:8d} | {n_cam:9d}")
        lines.append("  ----------------------------------------")
        if self.num_missing_modalities:
            lines.append(f"  samples with a missing modality (zero image, mask False): {self.num_missing_modalities}")
        if self.skipped:
            lines.append(f"  unreadable images skipped: {len(self.skipped)}")
        return "\n".join(lines)


@dataclass
class FewShotData:
    """A parsed few-shot release.

    ``splits[name]`` lists ``(path, label)``; ``label`` is a global class index into
    ``class_names`` (and ``class_keys``: wnid or folder name). Classes are numbered split by
    split in the order train, val, test, so the train classes are ``0..C_train-1`` and can
    be used directly as pre-training targets. ``split_classes[name]`` lists the class ids
    of a split. ``arrays`` holds in-memory images for ``pkl://file#index`` paths.
    """

    name: str
    root: str
    splits: dict[str, list[FewShotItem]]
    class_names: list[str]
    class_keys: list[str]
    arrays: ArrayStore = field(default_factory=ArrayStore)
    skipped: list[str] = field(default_factory=list)
    layout: str = ""

    @property
    def split_classes(self) -> dict[str, list[int]]:
        return {k: sorted({lab for _, lab in v}) for k, v in self.splits.items()}

    def summary(self) -> str:
        """Table of classes and images per split."""
        lines = [
            f"=> {self.name} loaded from {self.root}" + (f" ({self.layout})" if self.layout else ""),
            "  ------------------------------------------",
            "  split             | # classes | # images",
            "  ------------------------------------------",
        ]
        for split, items in self.splits.items():
            lines.append(f"  {split:<17} | {len({lab for _, lab in items}):9d} | {len(items):8d}")
        lines.append("  ------------------------------------------")
        if self.skipped:
            lines.append(f"  unreadable images skipped: {len(self.skipped)}")
        return "\n".join(lines)


class ClassIndex:
    """Assigns global class ids in first-seen order across splits (see :class:`FewShotData`)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.names: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, key: str, name: str | None = None) -> int:
        if key not in self._ids:
            self._ids[key] = len(self.keys)
            self.keys.append(key)
            self.names.append(name if name is not None else key)
        return self._ids[key]
