"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 split into 64 / 16 / 20 classes, 32 x 32 images.

Layouts read (the first one found wins), under ``<root>/CIFAR-FS`` (also ``CIFAR_FS``,
``cifar-fs``, ``cifar_fs``, ``cifar100``) or ``<root>`` itself:

1. **MetaOptNet pickles**: ``CIFAR_FS_{train,val,test}.pickle``, dicts with ``data``
   (N, 32, 32, 3) uint8 and ``labels`` (CIFAR-100 fine label ids).
2. **RFS pickles**: ``{train,val,test}.pickle`` with the same keys.
3. **Bertinetto's release**: ``data/<class name>/*.png`` and the class lists
   ``splits/bertinetto/{train,val,test}.txt`` (one class folder name per line).
4. **Class folders**: ``{train,val,test}/<class name>/*.png``.

Pickle images are addressed as ``pkl://<file>#<row>``. Class names: the folder names, or
for pickles the ``catname2label`` table when present, else the CIFAR-100 fine label names
by label id (``cifar100_names=True``, the ids of these pickles are CIFAR-100's; pass False
to keep ``label<id>``).
"""

from __future__ import annotations

from pathlib import Path

from datasets.bases import DatasetLayoutError, FewShotData, resolve_dataset_dir
from datasets.fewshot_layout import (
    CIFAR100_FINE,
    SPLITS,
    array_items,
    assemble,
    list_image_files,
    log_summary,
    missing_layout,
    read_class_folders,
    register_pickle_array,
)
from datasets.image_io import ArrayStore, load_pickle
from datasets.registry import DATASET_REGISTRY

LAYOUTS = """    (1) <root>/CIFAR_FS_{train,val,test}.pickle  (dict: data, labels)
    (2) <root>/{train,val,test}.pickle           (dict: data, labels)
    (3) <root>/data/<class>/*.png + <root>/splits/bertinetto/{train,val,test}.txt
    (4) <root>/{train,val,test}/<class>/*.png"""


@DATASET_REGISTRY.register("CIFAR-FS")
class CIFARFS(FewShotData):
    """The CIFAR-FS release in any of the layouts of the module docstring."""

    def __init__(
        self,
        root: str,
        *,
        cifar100_names: bool = True,
        verify_images: bool = False,
        skip_corrupt: bool = False,
        verbose: bool = True,
    ) -> None:
        """Parse the release under ``root`` (see :class:`datasets.mini_imagenet.MiniImageNet`)."""
        base = resolve_dataset_dir(
            root, ("CIFAR-FS", "CIFAR_FS", "cifar-fs", "cifar_fs", "cifar100"),
            ("CIFAR_FS_train.pickle", "train.pickle", "splits/bertinetto", "train"),
        )
        if not base.is_dir():
            raise DatasetLayoutError(f"CIFAR-FS: dataset folder '{base}' does not exist. Expected one of:\n{LAYOUTS}")
        arrays = ArrayStore()
        raw, layout = self._read(base, arrays, cifar100_names)
        kwargs = assemble("CIFAR-FS", base, raw, arrays=arrays, layout=layout,
                          verify_images=verify_images, skip_corrupt=skip_corrupt)
        super().__init__(**kwargs)
        log_summary(self, verbose)

    @staticmethod
    def _read(base: Path, arrays: ArrayStore, cifar100_names: bool):
        for pattern, kind in (("CIFAR_FS_{}.pickle", "MetaOptNet pickles"), ("{}.pickle", "RFS pickles")):
            if not any((base / pattern.format(s)).is_file() for s in SPLITS):
                continue
            raw = {}
            for s in SPLITS:
                file = base / pattern.format(s)
                if not file.is_file():
                    raise DatasetLayoutError(f"CIFAR-FS: missing split file '{file}'. Expected layout:\n{LAYOUTS}")
                data = load_pickle(str(file))
                if not isinstance(data, dict) or "data" not in data or "labels" not in data:
                    raise DatasetLayoutError(f"{file}: expected a dict with keys 'data' and 'labels'")
                id2name = {int(v): str(k) for k, v in (data.get("catname2label") or {}).items()}

                def key_of(lab, m=id2name) -> str:
                    lab = int(lab)
                    if lab in m:
                        return m[lab]
                    if cifar100_names and 0 <= lab < len(CIFAR100_FINE):
                        return CIFAR100_FINE[lab]
                    return f"label{lab}"

                raw[s] = array_items(file, list(data["labels"]), key_of)
                register_pickle_array(arrays, file, "data", data)
            return raw, kind
        split_lists = base / "splits" / "bertinetto"
        if split_lists.is_dir():
            raw = {}
            for s in SPLITS:
                txt = split_lists / f"{s}.txt"
                if not txt.is_file():
                    raise DatasetLayoutError(f"CIFAR-FS: missing class list '{txt}'. Expected layout:\n{LAYOUTS}")
                classes = [c.strip() for c in txt.read_text().splitlines() if c.strip()]
                if not classes:
                    raise DatasetLayoutError(f"CIFAR-FS: class list '{txt}' is empty")
                missing = [str(base / "data" / c) for c in classes if not (base / "data" / c).is_dir()]
                if missing:
                    raise DatasetLayoutError(f"CIFAR-FS: class folder(s) listed in '{txt}' not found: {missing[:5]}")
                raw[s] = [(str(base / "data" / c / n), c) for c in classes for n in list_image_files(base / "data" / c)]
            return raw, "bertinetto class lists"
        if all((base / s).is_dir() for s in SPLITS):
            return {s: read_class_folders(base / s) for s in SPLITS}, "class folders"
        raise missing_layout("CIFAR-FS", base, LAYOUTS)
