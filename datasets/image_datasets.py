"""Torch datasets over parsed lists, and their collate functions.

``ReIDImageDataset`` turns ``(paths, pid, camid, trackid)`` items into samples
``(images: dict[modality -> (3, H, W)], pid, camid, trackid, modality_mask (M,))``;
``reid_collate`` stacks them into ``(dict[modality -> (B, 3, H, W)], pids (B,), camids (B,),
trackids (B,), masks (B, M))``. ``FewShotImageDataset`` gives ``(image (3, H, W), label)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.bases import FewShotItem, ReIDItem
from datasets.image_io import ArrayStore, ImageReadError, read_image
from datasets.transforms import MultiModalTransform
from utils.modalities import MODALITIES

logger = logging.getLogger(__name__)

ReIDSample = tuple[dict[str, torch.Tensor], int, int, int, torch.Tensor]
#: ``{"images": {m: (B, 3, H, W)}, "pids": (B,), "camids": (B,), "trackids": (B,), "masks": (B, M)}``
ReIDBatch = dict[str, Any]


SampleKey = int | tuple[int, int]  # a dataset index, or (index, seed) from datasets.samplers.SeededBatches


#: what to do about an unreadable image, appended to the error when no skipping is configured
SKIP_HINT = (". Set DATASETS.SKIP_CORRUPT True to skip unreadable images (they are counted in the log), or "
             "DATASETS.VERIFY_IMAGES True to check every image before training")


@contextlib.contextmanager
def _sample_rng(key: SampleKey) -> Iterator[int]:
    """Yield the index of ``key``; with an ``(index, seed)`` key, the body's torch draws (the random
    augmentation) come from ``seed`` alone, and the process's random state is left as it was."""
    if isinstance(key, tuple):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield int(index)
    else:
        yield int(key)


class _SkipCorrupt:
    """Replace an unreadable sample by another one of the same group, counting the skips.

    Used by both datasets when ``skip_corrupt`` is on: the replacement keeps P x K and
    episode batches well formed. Each file is warned about once per process;
    ``num_skipped`` counts replacements in this process (each DataLoader worker has its own).
    """

    def __init__(self, groups: Sequence[int]) -> None:
        self._members: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            self._members[g].append(i)
        self.num_skipped = 0
        self.bad_files: set[str] = set()

    def candidates(self, index: int, group: int) -> list[int]:
        members = self._members[group]
        start = members.index(index)
        return members[start + 1:] + members[:start]

    def note(self, exc: ImageReadError) -> None:
        self.num_skipped += 1
        file = str(exc).split(": ", 1)[0]
        if file not in self.bad_files:
            self.bad_files.add(file)
            logger.warning("skipping unreadable image (replaced by another image of the same id/class): %s", exc)


class ReIDImageDataset(Dataset):
    """Multi-modal ReID samples from ``(paths, pid, camid, trackid)`` items.

    Args:
        items: e.g. ``data.train`` or ``data.query + data.gallery``.
        transform: a :class:`datasets.transforms.MultiModalTransform` (shared random ops).
        skip_corrupt: replace an unreadable sample by another image of the same pid (and
            count it) instead of raising :class:`ImageReadError` naming the file.
        modalities: order of the mask and of the image dict.
    """

    def __init__(
        self,
        items: Sequence[ReIDItem],
        transform: MultiModalTransform,
        *,
        skip_corrupt: bool = False,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.modalities = tuple(modalities)
        self.skip_corrupt = skip_corrupt
        self._skipper = _SkipCorrupt([it[1] for it in self.items]) if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def pids(self) -> list[int]:
        return [it[1] for it in self.items]

    @property
    def num_skipped(self) -> int:
        return self._skipper.num_skipped if self._skipper else 0

    def _load(self, index: int) -> ReIDSample:
        paths, pid, camid, trackid = self.items[index]
        pil: dict[str, Image.Image | None] = {m: None for m in self.modalities}
        for m, p in paths.items():
            if m in pil:
                pil[m] = read_image(p)
        images, mask = self.transform(pil)
        return images, pid, camid, trackid, mask

    def __getitem__(self, key: SampleKey) -> ReIDSample:
        with _sample_rng(key) as index:
            return self._get(index)

    def _get(self, index: int) -> ReIDSample:
        try:
            return self._load(index)
        except ImageReadError as exc:
            if self._skipper is None:
                raise ImageReadError(f"{exc}{SKIP_HINT}") from exc
            self._skipper.note(exc)
            for j in self._skipper.candidates(index, self.items[index][1]):
                try:
                    images, _, _, _, mask = self._load(j)
                except ImageReadError as exc2:
                    self._skipper.note(exc2)
                    continue
                _, pid, camid, trackid = self.items[index]
                return images, pid, camid, trackid, mask
            raise ImageReadError(f"{exc}; and no other readable image of pid {self.items[index][1]}") from exc


def reid_collate(batch: Sequence[ReIDSample]) -> ReIDBatch:
    """Stack samples into a :data:`ReIDBatch` dict (``images`` by modality, ``pids``, ``camids``, ``trackids``,
    ``masks``)."""
    images, pids, camids, trackids, masks = zip(*batch)
    return {
        "images": {m: torch.stack([img[m] for img in images]) for m in images[0]},
        "pids": torch.tensor(pids, dtype=torch.int64),
        "camids": torch.tensor(camids, dtype=torch.int64),
        "trackids": torch.tensor(trackids, dtype=torch.int64),
        "masks": torch.stack(masks),
    }


class FewShotImageDataset(Dataset):
    """``(image (3, H, W), label)`` from ``(path, label)`` items (files or ``pkl://`` rows).

    ``arrays`` is the dataset's :class:`ArrayStore` (``data.arrays``) for pickle-backed
    releases; ``skip_corrupt`` replaces an unreadable image by another of the same class.
    """

    def __init__(
        self,
        items: Sequence[FewShotItem],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        arrays: ArrayStore | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.arrays = arrays
        self._skipper = _SkipCorrupt([lab for _, lab in self.items]) if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [lab for _, lab in self.items]

    @property
    def num_skipped(self) -> int:
        return self._skipper.num_skipped if self._skipper else 0

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        with _sample_rng(key) as index:
            return self._get(index)

    def _get(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            return self.transform(read_image(path, self.arrays)), label
        except ImageReadError as exc:
            if self._skipper is None:
                raise ImageReadError(f"{exc}{SKIP_HINT}") from exc
            self._skipper.note(exc)
            for j in self._skipper.candidates(index, label):
                try:
                    return self.transform(read_image(self.items[j][0], self.arrays)), label
                except ImageReadError as exc2:
                    self._skipper.note(exc2)
            raise ImageReadError(f"{exc}; and no other readable image of class {label}") from exc


class EpisodeCollate:
    """Collate an episode batch (class-major, ``k_shot + n_query`` per class) into a dict.

    Returns ``support`` (N*K, 3, H, W), ``support_labels`` (N*K,) in 0..N-1, ``query``
    (N*Q, 3, H, W), ``query_labels`` (N*Q,), and ``class_ids`` (N,): the dataset's global
    class index of each episode class (index ``data.class_names`` with it for SAP anchors).
    """

    def __init__(self, n_way: int, k_shot: int, n_query: int) -> None:
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def __call__(self, batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        n, k, q = self.n_way, self.k_shot, self.n_query
        if len(batch) != n * (k + q):
            raise ValueError(f"episode batch has {len(batch)} samples, expected n_way*(k_shot+n_query) = {n * (k + q)}")
        images = torch.stack([b[0] for b in batch]).view(n, k + q, *batch[0][0].shape)
        labels = torch.tensor([b[1] for b in batch], dtype=torch.int64).view(n, k + q)
        class_ids = labels[:, 0]
        if not bool((labels == class_ids[:, None]).all()):
            raise ValueError("episode batch is not class-major (use datasets.samplers.EpisodeSampler)")
        episode_labels = torch.arange(n).repeat_interleave
        return {
            "support": images[:, :k].reshape(n * k, *images.shape[2:]),
            "support_labels": episode_labels(k),
            "query": images[:, k:].reshape(n * q, *images.shape[2:]),
            "query_labels": episode_labels(q),
            "class_ids": class_ids,
        }


def fewshot_collate(batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Plain batch for pre-training and feature extraction: ``{"images": (B, 3, H, W), "labels": (B,)}``."""
    images, labels = zip(*batch)
    return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.int64)}
