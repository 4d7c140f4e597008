"""tieredImageNet (Ren et al. 2018): 351 / 97 / 160 ImageNet classes from 34 super-categories.

Layouts read (the first one found wins), under ``<root>/tieredImageNet`` (also
``tiered-imagenet``, ``tiered_imagenet``, ``tieredimagenet``) or ``<root>`` itself:

1. **Original release** (Ren et al.): ``{train,val,test}_images_png.pkl`` (a list of
   PNG-encoded images) with ``{train,val,test}_labels.pkl`` (dict with ``label_specific``
   ids into ``label_specific_str`` wnids, plus the general labels).
2. **Decompressed npz** (MetaOptNet / RFS): ``{split}_images.npz`` (key ``images``,
   (N, 84, 84, 3) uint8) with ``{split}_labels.pkl`` (key ``labels``, or
   ``label_specific`` [+ ``label_specific_str``]).
3. **Class folders** (DeepEMD, FEAT-style image folders): ``{train,val,test}/<wnid>/*.jpg``.

Pickle/npz images are addressed as ``pkl://<file>#<row>`` and loaded on first use.
Class names come from the WordNet table when the wnids are known (``label_specific_str``
or folder names); otherwise the class key is ``label<id>`` (``labels`` are global ids in
MetaOptNet's files) or ``<split>/<id>`` (per-split ``label_specific`` without strings).
"""

from __future__ import annotations

from pathlib import Path

from datasets.bases import DatasetLayoutError, FewShotData, resolve_dataset_dir
from datasets.fewshot_layout import (
    SPLITS,
    array_items,
    assemble,
    log_summary,
    missing_layout,
    read_class_folders,
    register_npz_array,
)
from datasets.image_io import ArrayStore, load_pickle
from datasets.registry import DATASET_REGISTRY

LAYOUTS = """    (1) <root>/{train,val,test}_images_png.pkl + <root>/{train,val,test}_labels.pkl  (Ren et al. release)
    (2) <root>/{train,val,test}_images.npz (key 'images') + <root>/{train,val,test}_labels.pkl
    (3) <root>/{train,val,test}/<wnid>/*.jpg"""


def _label_keys(file: Path, split: str) -> list[str]:
    data = load_pickle(str(file))
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{file}: expected a dict with 'label_specific' or 'labels'")
    if "label_specific" in data:
        ids = [int(v) for v in data["label_specific"]]
        strs = data.get("label_specific_str")
        if strs is not None:
            return [str(strs[i]) for i in ids]
        return [f"{split}/{i}" for i in ids]
    if "labels" in data:
        return [f"label{int(v)}" for v in data["labels"]]
    raise DatasetLayoutError(f"{file}: expected key 'label_specific' or 'labels', found {sorted(data)}")


@DATASET_REGISTRY.register("tieredImageNet")
class TieredImageNet(FewShotData):
    """The tieredImageNet release in any of the layouts of the module docstring."""

    def __init__(
        self, root: str, *, verify_images: bool = False, skip_corrupt: bool = False, verbose: bool = True
    ) -> None:
        """Parse the release under ``root`` (arguments as for :class:`datasets.mini_imagenet.MiniImageNet`)."""
        base = resolve_dataset_dir(
            root, ("tieredImageNet", "tiered-imagenet", "tiered_imagenet", "tieredimagenet"),
            ("train_labels.pkl", "train_images_png.pkl", "train_images.npz", "train"),
        )
        if not base.is_dir():
            raise DatasetLayoutError(f"tieredImageNet: dataset folder '{base}' does not exist. Expected one of:\n{LAYOUTS}")
        arrays = ArrayStore()
        raw, layout = self._read(base, arrays)
        kwargs = assemble("tieredImageNet", base, raw, arrays=arrays, layout=layout,
                          verify_images=verify_images, skip_corrupt=skip_corrupt)
        super().__init__(**kwargs)
        log_summary(self, verbose)

    @staticmethod
    def _read(base: Path, arrays: ArrayStore):
        for suffix, kind in (("_images_png.pkl", "png pickles"), ("_images.npz", "npz")):
            if not any((base / f"{s}{suffix}").is_file() for s in SPLITS):
                continue
            raw = {}
            for s in SPLITS:
                images, labels = base / f"{s}{suffix}", base / f"{s}_labels.pkl"
                for f in (images, labels):
                    if not f.is_file():
                        raise DatasetLayoutError(f"tieredImageNet: missing split file '{f}'. Expected layout:\n{LAYOUTS}")
                keys = _label_keys(labels, s)
                raw[s] = array_items(images, keys, str)
                if kind == "npz":
                    register_npz_array(arrays, images)
                else:
                    path = str(images)
                    arrays.register(path, lambda p=path: load_pickle(p))
            return raw, kind
        if all((base / s).is_dir() for s in SPLITS):
            return {s: read_class_folders(base / s) for s in SPLITS}, "class folders"
        raise missing_layout("tieredImageNet", base, LAYOUTS)
