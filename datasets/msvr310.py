"""MSVR310: multi-spectral vehicle ReID, 310 vehicles.

Layout read, as in the public DeMo / TOP-ReID loaders (924973292/DeMo and
924973292/TOP-ReID, ``data/datasets/msvr310.py``)::

    <root>/MSVR310/            (or <root>/msvr310, or <root> itself)
        bounding_box_train/<vid>/{vis,ni,th}/*.jpg
        query3/<vid>/{vis,ni,th}/*.jpg
        bounding_box_test/<vid>/{vis,ni,th}/*.jpg

``<vid>`` is a folder per vehicle (an integer name). ``vis`` (RGB), ``ni`` (near infrared)
and ``th`` (thermal) hold the same file names. File-name grammar, by character position
as in the public code: ``name[0:4]`` vehicle id, ``name[6:9]`` scene id, ``name[11]``
camera id (already 0-based, 0..7), e.g. ``0013_s021_v2_004.jpg`` -> vid 13, scene 21,
camid 2. The scene id is used as ``trackid``, and evaluation follows MSVR310's protocol as DeMo
runs it: a query's gallery loses the items of its id in its scene (not only its camera). Train
ids are relabelled 0..N-1 in ascending order of the vehicle folders; query from ``query3/``,
gallery from ``bounding_box_test/``.
Statistics reported in the papers (not checked against the release here): 155 train / 155
test vehicles, 2,087 image triplets in all.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets.bases import DatasetLayoutError, ReIDData, ReIDItem, resolve_dataset_dir
from datasets.registry import DATASET_REGISTRY
from datasets.reid_layout import finish, log_summary, pair_modalities

LAYOUT = """    <root>/MSVR310/   (or <root>/msvr310, or <root> itself)
        bounding_box_train/<vid>/{vis,ni,th}/<vid:4d>_s<scene:3d>_v<cam>_*.jpg
        query3/<vid>/{vis,ni,th}/...
        bounding_box_test/<vid>/{vis,ni,th}/..."""

MODALITY_DIRS = {"RGB": "vis", "NI": "ni", "TI": "th"}


def parse_msvr310_name(name: str) -> tuple[int, int, int]:
    """``(vid, camid, sceneid)`` from an MSVR310 file name (positional grammar, camid 0-based)."""
    try:
        vid, sceneid, camid = int(name[0:4]), int(name[6:9]), int(name[11])
    except (IndexError, ValueError):
        raise ValueError(
            f"cannot parse '{name}': expected '<vid:4 digits>_s<scene:3 digits>_v<cam digit>...'"
        ) from None
    if not 0 <= camid <= 7:
        raise ValueError(f"'{name}': camera {camid} outside the release's range 0..7")
    return vid, camid, sceneid


@DATASET_REGISTRY.register("MSVR310")
class MSVR310(ReIDData):
    """The MSVR310 release (see the module docstring for the layout and name grammar)."""

    splits = {"train": "bounding_box_train", "query": "query3", "gallery": "bounding_box_test"}
    eval_protocol = "scene"

    def __init__(
        self,
        root: str,
        *,
        allow_missing_modality: bool = False,
        verify_images: bool = False,
        skip_corrupt: bool = False,
        verbose: bool = True,
    ) -> None:
        """Parse the release under ``root`` (arguments as for :class:`datasets.rgbnt201.RGBNT201`)."""
        base = resolve_dataset_dir(root, ("MSVR310", "msvr310"), tuple(self.splits.values()))
        if not base.is_dir():
            raise DatasetLayoutError(f"MSVR310: dataset folder '{base}' does not exist. Expected layout:\n{LAYOUT}")
        parsed = {}
        num_missing = 0
        for split, sub in self.splits.items():
            folder = base / sub
            if not folder.is_dir():
                raise DatasetLayoutError(f"MSVR310: split folder '{folder}' does not exist. Expected layout:\n{LAYOUT}")
            parsed[split], miss = self._parse(folder, relabel_ids=split == "train", allow_missing=allow_missing_modality)
            num_missing += miss
        kwargs = finish(
            "MSVR310", base, parsed["train"], parsed["query"], parsed["gallery"], num_missing=num_missing,
            verify_images=verify_images, skip_corrupt=skip_corrupt,
        )
        super().__init__(**kwargs)
        log_summary(self, verbose)

    @staticmethod
    def _parse(folder: Path, *, relabel_ids: bool, allow_missing: bool) -> tuple[list[ReIDItem], int]:
        vid_dirs = sorted(d for d in os.listdir(folder) if (folder / d).is_dir() and not d.startswith("."))
        try:
            folder_ids = {d: int(d) for d in vid_dirs}
        except ValueError as exc:
            raise DatasetLayoutError(
                f"MSVR310: '{folder}' must hold one integer-named folder per vehicle ({exc}). Expected layout:\n{LAYOUT}"
            ) from None
        vid2label = {vid: i for i, vid in enumerate(sorted(set(folder_ids.values())))}
        items: list[ReIDItem] = []
        num_missing = 0
        for d in vid_dirs:
            modality_folders = {m: folder / d / sub for m, sub in MODALITY_DIRS.items()}
            pairs, miss = pair_modalities("MSVR310", modality_folders, allow_missing)
            num_missing += miss
            for name, paths in pairs:
                try:
                    vid, camid, sceneid = parse_msvr310_name(name)
                except ValueError as exc:
                    raise ValueError(f"MSVR310: {exc} (file {modality_folders['RGB'] / name})") from None
                if vid != folder_ids[d]:
                    raise ValueError(
                        f"MSVR310: file {modality_folders['RGB'] / name} names vehicle {vid} but lies in folder '{d}'"
                    )
                items.append((paths, vid2label[vid] if relabel_ids else vid, camid, sceneid))
        return items, num_missing
