"""RGBNT201: multi-modal person ReID (RGB / near infrared / thermal infrared), 201 identities.

Layout read, as in the public DeMo / TOP-ReID loaders (924973292/DeMo and
924973292/TOP-ReID, ``data/datasets/RGBNT201.py``)::

    <root>/RGBNT201/            (or <root> itself)
        train_171/RGB/*.jpg   train_171/NI/*.jpg   train_171/TI/*.jpg
        test/RGB/*.jpg        test/NI/*.jpg        test/TI/*.jpg

The three modality folders of a split hold the same file names. File-name grammar
``<pid>_cam<c>_<...>.jpg``, e.g. ``000171_cam3_2_07.jpg``: ``pid`` is the first six
characters of the first ``_``-separated token, ``camid`` the fourth character of the
second token minus one (so ``cam1..cam4`` -> 0..3), ``trackid`` is -1. Train pids are
relabelled to 0..N-1 in ascending raw-id order; **query and gallery are both the whole
``test`` folder** (the standard RGBNT201 protocol: same-id same-camera matches are removed
at evaluation). Statistics reported in the papers (not checked against the release here):
171 train ids, 30 test ids, 4 cameras, 4,787 image triplets.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets.bases import DatasetLayoutError, ReIDData, ReIDItem, resolve_dataset_dir
from datasets.registry import DATASET_REGISTRY
from datasets.reid_layout import finish, log_summary, pair_modalities, relabel

logger = logging.getLogger(__name__)

LAYOUT = """    <root>/RGBNT201/   (or <root> itself)
        train_171/{RGB,NI,TI}/<pid:6d>_cam<c>_*.jpg
        test/{RGB,NI,TI}/<pid:6d>_cam<c>_*.jpg"""


def parse_rgbnt201_name(name: str) -> tuple[int, int]:
    """``(pid, camid)`` from an RGBNT201 file name; camid is 0-based."""
    tokens = name.split("_")
    try:
        pid = int(tokens[0][0:6])
        cam_token = tokens[1]
        if not cam_token.startswith("cam"):
            raise ValueError(cam_token)
        camid = int(cam_token[3]) - 1
    except (IndexError, ValueError) as exc:
        raise ValueError(
            f"RGBNT201: cannot parse '{name}': expected '<pid:6 digits>_cam<digit>_...jpg' ({exc})"
        ) from None
    return pid, camid


def parse_rgbnt_split(
    dataset: str, split_dir: Path, *, relabel_ids: bool, allow_missing_modality: bool
) -> tuple[list[ReIDItem], int]:
    """Parse one ``<split>/{RGB,NI,TI}`` folder in the RGBNT201 grammar (only ``*.jpg``, as public)."""
    folders = {m: split_dir / m for m in ("RGB", "NI", "TI")}
    pairs, num_missing = pair_modalities(dataset, folders, allow_missing_modality, extensions=(".jpg",))
    items: list[ReIDItem] = []
    for name, paths in pairs:
        try:
            pid, camid = parse_rgbnt201_name(name)
        except ValueError as exc:
            raise ValueError(f"{exc} (file {split_dir / 'RGB' / name})") from None
        items.append((paths, pid, camid, -1))
    return (relabel(items) if relabel_ids else items), num_missing


class RGBNT201Layout(ReIDData):
    """Parser of the RGBNT201 layout, shared by :class:`RGBNT201` and the synthetic set."""

    dataset_name = "RGBNT201"
    dir_names: tuple[str, ...] = ("RGBNT201",)
    train_dir = "train_171"
    test_dir = "test"

    def __init__(
        self,
        root: str,
        *,
        allow_missing_modality: bool = False,
        verify_images: bool = False,
        skip_corrupt: bool = False,
        verbose: bool = True,
    ) -> None:
        """Parse the release under ``root``.

        Args:
            root: the folder holding ``RGBNT201/`` or the release folder itself.
            allow_missing_modality: keep samples whose NI/TI file is missing (zero image,
                False mask bit) instead of raising.
            verify_images: decode every image now (slow) to find corrupt files early.
            skip_corrupt: with ``verify_images``, drop and count unreadable images instead of raising.
            verbose: log the summary table.
        """
        base = self._locate(root)
        for sub in (self.train_dir, self.test_dir):
            if not (base / sub).is_dir():
                raise DatasetLayoutError(
                    f"{self.dataset_name}: split folder '{base / sub}' does not exist. Expected layout:\n{LAYOUT}"
                )
        train, miss_tr = parse_rgbnt_split(
            self.dataset_name, base / self.train_dir, relabel_ids=True, allow_missing_modality=allow_missing_modality
        )
        test, miss_te = parse_rgbnt_split(
            self.dataset_name, base / self.test_dir, relabel_ids=False, allow_missing_modality=allow_missing_modality
        )
        kwargs = finish(
            self.dataset_name, base, train, test, test, num_missing=miss_tr + miss_te,
            verify_images=verify_images, skip_corrupt=skip_corrupt,
        )
        super().__init__(**kwargs)
        log_summary(self, verbose)

    def _locate(self, root: str) -> Path:
        base = resolve_dataset_dir(root, self.dir_names, (self.train_dir, self.test_dir))
        if not base.is_dir():
            raise DatasetLayoutError(
                f"{self.dataset_name}: dataset folder '{base}' does not exist. Expected layout:\n{LAYOUT}"
            )
        return base


@DATASET_REGISTRY.register("RGBNT201")
class RGBNT201(RGBNT201Layout):
    """The RGBNT201 release (see the module docstring for the layout and name grammar)."""
