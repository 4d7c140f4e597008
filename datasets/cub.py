"""CUB-200-2011 few-shot splits (100 / 50 / 50 bird species in the common split).

Layouts read (the first one found wins), under ``<root>/CUB`` (also ``CUB_200_2011``,
``cub``) or ``<root>`` itself:

1. **CloserLook filelists** (Chen et al. 2019, also used by many later works):
   ``base.json``, ``val.json``, ``novel.json`` (train / val / test), each
   ``{"label_names": [...], "image_names": [...], "image_labels": [...]}``. The image
   paths in these files are absolute paths of the machine that wrote them; a path that
   does not exist is re-rooted as ``<root>/images/<class folder>/<file>`` (also tried under
   ``<root>/CUB_200_2011/images``).
2. **easyfsl specs**: ``{train,val,test}.json`` with ``{"class_names": [...],
   "class_roots": [...]}`` (a folder per class, relative paths resolved against ``<root>``).
3. **CSV splits** (FEAT style): ``split/{train,val,test}.csv`` (or in ``<root>``) with
   header ``filename,label`` and images under ``images/`` (``images/<label>/<file>`` too).
4. **Class folders**: ``{train,val,test}/<class>/*.jpg``.

Class names: the folder / label names without the numeric prefix and with spaces
(``001.Black_footed_Albatross`` -> ``Black footed Albatross``).
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets.bases import DatasetLayoutError, FewShotData, first_few, resolve_dataset_dir
from datasets.fewshot_layout import (
    SPLITS,
    assemble,
    list_image_files,
    log_summary,
    missing_layout,
    read_class_folders,
    read_csv_split,
)
from datasets.image_io import ArrayStore
from datasets.registry import DATASET_REGISTRY

LAYOUTS = """    (1) <root>/{base,val,novel}.json  (label_names, image_names, image_labels) + <root>/images/<class>/*.jpg
    (2) <root>/{train,val,test}.json  (class_names, class_roots)
    (3) <root>/split/{train,val,test}.csv (header 'filename,label') + <root>/images/
    (4) <root>/{train,val,test}/<class>/*.jpg"""

CLOSERLOOK_FILES = {"train": "base.json", "val": "val.json", "test": "novel.json"}


def _load_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise DatasetLayoutError(f"CUB: '{file}' is not valid JSON ({exc})") from None


@DATASET_REGISTRY.register("CUB")
class CUB(FewShotData):
    """The CUB few-shot splits in any of the layouts of the module docstring."""

    def __init__(
        self, root: str, *, verify_images: bool = False, skip_corrupt: bool = False, verbose: bool = True
    ) -> None:
        """Parse the release under ``root`` (see :class:`datasets.mini_imagenet.MiniImageNet`)."""
        base = resolve_dataset_dir(
            root, ("CUB", "CUB_200_2011", "cub"), ("base.json", "train.json", "split/train.csv", "train.csv", "train")
        )
        if not base.is_dir():
            raise DatasetLayoutError(f"CUB: dataset folder '{base}' does not exist. Expected one of:\n{LAYOUTS}")
        raw, layout = self._read(base)
        kwargs = assemble("CUB", base, raw, arrays=ArrayStore(), layout=layout,
                          verify_images=verify_images, skip_corrupt=skip_corrupt)
        super().__init__(**kwargs)
        log_summary(self, verbose)

    @staticmethod
    def _read(base: Path):
        if (base / "base.json").is_file() or (base / "novel.json").is_file():  # val.json is shared with (2)
            roots = [base / "images", base / "CUB_200_2011" / "images", base]
            raw = {}
            for s, fname in CLOSERLOOK_FILES.items():
                file = base / fname
                if not file.is_file():
                    raise DatasetLayoutError(f"CUB: missing split file '{file}'. Expected layout:\n{LAYOUTS}")
                meta = _load_json(file)
                try:
                    names, paths, labels = meta["label_names"], meta["image_names"], meta["image_labels"]
                except KeyError as exc:
                    raise DatasetLayoutError(f"CUB: '{file}' lacks key {exc} (label_names, image_names, image_labels)") from None
                items, missing = [], []
                for p, lab in zip(paths, labels):
                    path = Path(p)
                    if not path.is_file():
                        rel = Path(*path.parts[-2:])
                        path = next((r / rel for r in roots if (r / rel).is_file()), path)
                    if not path.is_file():
                        missing.append(p)
                    items.append((str(path), str(names[int(lab)])))
                if missing:
                    raise DatasetLayoutError(
                        f"CUB: {len(missing)} image(s) of '{file}' not found (also tried under "
                        f"{', '.join(str(r) for r in roots[:2])}): {first_few(missing)}"
                    )
                raw[s] = items
            return raw, "CloserLook json"
        if all((base / f"{s}.json").is_file() for s in SPLITS):
            raw = {}
            for s in SPLITS:
                meta = _load_json(base / f"{s}.json")
                if "class_names" not in meta or "class_roots" not in meta:
                    raise DatasetLayoutError(f"CUB: '{base / f'{s}.json'}' lacks 'class_names' / 'class_roots'")
                items = []
                for name, croot in zip(meta["class_names"], meta["class_roots"]):
                    folder = Path(croot) if Path(croot).is_absolute() else base / croot
                    if not folder.is_dir():
                        raise DatasetLayoutError(f"CUB: class folder '{folder}' listed in {s}.json does not exist")
                    items += [(str(folder / n), str(name)) for n in list_image_files(folder)]
                raw[s] = items
            return raw, "easyfsl json"
        for csv_dir in (base / "split", base):
            if any((csv_dir / f"{s}.csv").is_file() for s in SPLITS):
                for s in SPLITS:
                    if not (csv_dir / f"{s}.csv").is_file():
                        raise DatasetLayoutError(f"CUB: missing split file '{csv_dir / f'{s}.csv'}'. Expected:\n{LAYOUTS}")
                images = [base / "images", base / "CUB_200_2011" / "images"]
                return {s: read_csv_split(csv_dir / f"{s}.csv", images) for s in SPLITS}, "csv"
        if all((base / s).is_dir() for s in SPLITS):
            return {s: read_class_folders(base / s) for s in SPLITS}, "class folders"
        raise missing_layout("CUB", base, LAYOUTS)
