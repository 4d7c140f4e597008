"""RGBNT100: multi-modal vehicle ReID, 100 vehicles, 8 cameras.

Layout read, as in the public DeMo / TOP-ReID loaders (924973292/DeMo and
924973292/TOP-ReID, ``data/datasets/RGBNT100.py`` and ``bases.py``)::

    <root>/RGBNT100/rgbir/     (or <root>/rgbir, or <root> itself)
        bounding_box_train/*.jpg   query/*.jpg   bounding_box_test/*.jpg

Each file holds the three modalities side by side (768 x 128: RGB | NI | TI); the
public reader crops the boxes ``(0,0,256,128)``, ``(256,0,512,128)``, ``(512,0,768,128)``,
which this loader reproduces through ``file.jpg#crop=l,u,r,b`` virtual paths. File-name
grammar: the first ``<pid>_c<cam>`` match of the regex ``([-\\d]+)_c([-\\d]+)``, e.g.
``0001_c003_00031.jpg`` -> pid 1, camid 2 (0-based); the public loader requires
``1 <= pid <= 600`` and ``1 <= cam <= 8`` (here: an error naming the file). ``trackid``
is -1. Train pids relabelled 0..N-1 in ascending raw-id order; query from ``query/``,
gallery from ``bounding_box_test/``. Statistics reported in the papers (not checked against
the release here): 50 train / 50 test vehicles; 8675 train, 1715 query and 8575 gallery
image triplets.

The regex is applied to the file name only (the public code searches the whole path,
which only differs when a parent folder itself matches ``<digits>_c<digits>``).
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets.bases import DatasetLayoutError, ReIDData, ReIDItem, resolve_dataset_dir
from datasets.image_io import make_crop_ref
from datasets.registry import DATASET_REGISTRY
from datasets.reid_layout import finish, list_images, log_summary, relabel

LAYOUT = """    <root>/RGBNT100/rgbir/   (or <root>/rgbir, or <root> itself)
        bounding_box_train/<pid>_c<cam>_*.jpg   (768x128: RGB | NI | TI side by side)
        query/<pid>_c<cam>_*.jpg
        bounding_box_test/<pid>_c<cam>_*.jpg"""

NAME_PATTERN = re.compile(r"([-\d]+)_c([-\d]+)")
#: Boxes (left, upper, right, lower) of the RGB, NI and TI parts, as cropped by the public reader.
MODALITY_BOXES = {"RGB": (0, 0, 256, 128), "NI": (256, 0, 512, 128), "TI": (512, 0, 768, 128)}


def parse_rgbnt100_name(name: str) -> tuple[int, int]:
    """``(pid, camid)`` from an RGBNT100 / Market-style name; camid is 0-based."""
    match = NAME_PATTERN.search(name)
    if match is None:
        raise ValueError(f"cannot parse '{name}': expected '<pid>_c<cam>...' (regex {NAME_PATTERN.pattern})")
    pid, cam = (int(g) for g in match.groups())
    if not 1 <= pid <= 600 or not 1 <= cam <= 8:
        raise ValueError(f"'{name}': pid {pid} or camera {cam} outside the release's range (1..600, 1..8)")
    return pid, cam - 1


@DATASET_REGISTRY.register("RGBNT100")
class RGBNT100(ReIDData):
    """The RGBNT100 release (see the module docstring for the layout and name grammar)."""

    splits = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

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

        ``allow_missing_modality`` is accepted for a uniform signature; RGBNT100 stores
        all modalities in one file, so none can be missing. See :class:`RGBNT201` for the
        other arguments.
        """
        del allow_missing_modality
        base = resolve_dataset_dir(root, ("RGBNT100/rgbir", "rgbir"), tuple(self.splits.values()))
        if not base.is_dir():
            raise DatasetLayoutError(f"RGBNT100: dataset folder '{base}' does not exist. Expected layout:\n{LAYOUT}")
        parsed = {}
        for split, sub in self.splits.items():
            folder = base / sub
            if not folder.is_dir():
                raise DatasetLayoutError(
                    f"RGBNT100: split folder '{folder}' does not exist. Expected layout:\n{LAYOUT}"
                )
            parsed[split] = self._parse(folder)
        kwargs = finish(
            "RGBNT100", base, relabel(parsed["train"]), parsed["query"], parsed["gallery"], num_missing=0,
            verify_images=verify_images, skip_corrupt=skip_corrupt,
        )
        super().__init__(**kwargs)
        log_summary(self, verbose)

    @staticmethod
    def _parse(folder: Path) -> list[ReIDItem]:
        items: list[ReIDItem] = []
        for name in list_images(folder, (".jpg",)):
            try:
                pid, camid = parse_rgbnt100_name(name)
            except ValueError as exc:
                raise ValueError(f"RGBNT100: {exc} (file {folder / name})") from None
            file = str(folder / name)
            items.append(({m: make_crop_ref(file, box) for m, box in MODALITY_BOXES.items()}, pid, camid, -1))
        return items
