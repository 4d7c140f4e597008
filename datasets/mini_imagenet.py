"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 splits): 64 / 16 / 20 classes of 600 images.

Layouts read (the first one found wins), under ``<root>/miniImageNet`` (also
``mini-imagenet``, ``miniimagenet``, ``mini_imagenet``) or ``<root>`` itself:

1. **Ravi-Larochelle CSV** (the original release; FEAT, easyfsl): ``train.csv``,
   ``val.csv``, ``test.csv`` (in the folder or in ``split/``) with header ``filename,label``
   (``n0153282900000005.jpg,n01532829``) and the images in ``images/<filename>`` (or
   ``images/<label>/<filename>``).
2. **Pickle cache** (Ravi's cache as read by learn2learn / protonets):
   ``mini-imagenet-cache-{train,val,test}.pkl``, a dict with ``image_data`` (N, 84, 84, 3)
   uint8 and ``class_dict`` {wnid: [row indices]}.
3. **MetaOptNet / RFS pickles**: ``miniImageNet_category_split_train_phase_train.pickle``,
   ``..._val.pickle``, ``..._test.pickle`` (and the optional ``..._train_phase_val`` /
   ``..._train_phase_test``, exposed as extra splits of the train classes), dicts with
   ``data`` (N, 84, 84, 3), ``labels`` (global class ids) and ``catname2label`` {wnid: id}.
4. **Class folders** (FRN, DeepEMD): ``{train,val,test}/<wnid>/*.jpg``.

Pickle-backed images are addressed as ``pkl://<file>#<row>`` (see ``datasets.image_io``);
the arrays stay in ``data.arrays``. Class names come from the WordNet table
(``datasets/imagenet_class_names.tsv``); labels that are not wnids (the synthetic set)
become their text with ``_`` read as a space.
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
    read_csv_split,
    register_pickle_array,
)
from datasets.image_io import ArrayStore, load_pickle, make_array_ref
from datasets.registry import DATASET_REGISTRY

LAYOUTS = """    (1) <root>/{train,val,test}.csv (or <root>/split/*.csv) with header 'filename,label' + <root>/images/
    (2) <root>/mini-imagenet-cache-{train,val,test}.pkl  (dict: image_data, class_dict)
    (3) <root>/miniImageNet_category_split_{train_phase_train,val,test}.pickle  (dict: data, labels[, catname2label])
    (4) <root>/{train,val,test}/<wnid>/*.jpg"""

METAOPT_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
    "train_phase_val": "miniImageNet_category_split_train_phase_val.pickle",
    "train_phase_test": "miniImageNet_category_split_train_phase_test.pickle",
}


def read_metaopt_pickles(
    base: Path, files: dict[str, str], arrays: ArrayStore, required: tuple[str, ...] = SPLITS
) -> dict[str, list[tuple[str, str]]]:
    """Parse MetaOptNet/RFS-style pickles ``{data, labels[, catname2label]}`` -> raw split items."""
    raw = {}
    for split, fname in files.items():
        file = base / fname
        if not file.is_file():
            if split in required:
                raise DatasetLayoutError(f"missing split file '{file}'. Expected layout:\n{LAYOUTS}")
            continue
        data = load_pickle(str(file))
        if not isinstance(data, dict) or "data" not in data or "labels" not in data:
            raise DatasetLayoutError(f"{file}: expected a dict with keys 'data' and 'labels'")
        id2name = {int(v): str(k) for k, v in (data.get("catname2label") or {}).items()}
        raw[split] = array_items(file, list(data["labels"]), lambda lab, m=id2name: m.get(int(lab), f"label{int(lab)}"))
        register_pickle_array(arrays, file, "data", data)
    return raw


class MiniImageNetLayout(FewShotData):
    """Parser of the miniImageNet layouts, shared with the synthetic few-shot set."""

    dataset_name = "miniImageNet"
    dir_names: tuple[str, ...] = ("miniImageNet", "mini-imagenet", "miniimagenet", "mini_imagenet")

    def __init__(
        self, root: str, *, verify_images: bool = False, skip_corrupt: bool = False, verbose: bool = True
    ) -> None:
        """Parse the release under ``root``.

        Args:
            root: the folder holding the release folder, or the release folder itself.
            verify_images: decode every image now to find corrupt files early (slow).
            skip_corrupt: with ``verify_images``, drop and count unreadable images instead of raising.
            verbose: log the summary table.
        """
        base = resolve_dataset_dir(
            root, self.dir_names,
            ("train.csv", "split/train.csv", "mini-imagenet-cache-train.pkl", METAOPT_FILES["train"], "train"),
        )
        if not base.is_dir():
            raise DatasetLayoutError(f"{self.dataset_name}: dataset folder '{base}' does not exist. Expected one of:\n{LAYOUTS}")
        arrays = ArrayStore()
        raw, layout = self._read(base, arrays)
        kwargs = assemble(self.dataset_name, base, raw, arrays=arrays, layout=layout,
                          verify_images=verify_images, skip_corrupt=skip_corrupt)
        super().__init__(**kwargs)
        log_summary(self, verbose)

    def _read(self, base: Path, arrays: ArrayStore):
        name = self.dataset_name
        for csv_dir in (base, base / "split", base / "splits"):
            present = [s for s in SPLITS if (csv_dir / f"{s}.csv").is_file()]
            if present:
                missing = [str(csv_dir / f"{s}.csv") for s in SPLITS if s not in present]
                if missing:
                    raise DatasetLayoutError(f"{name}: missing split file(s) {missing}. Expected layout:\n{LAYOUTS}")
                images = base / "images"
                if not images.is_dir():
                    raise DatasetLayoutError(f"{name}: image folder '{images}' does not exist. Expected layout:\n{LAYOUTS}")
                return {s: read_csv_split(csv_dir / f"{s}.csv", [images]) for s in SPLITS}, "csv"
        if any((base / f"mini-imagenet-cache-{s}.pkl").is_file() for s in SPLITS):
            raw = {}
            for s in SPLITS:
                file = base / f"mini-imagenet-cache-{s}.pkl"
                if not file.is_file():
                    raise DatasetLayoutError(f"{name}: missing split file '{file}'. Expected layout:\n{LAYOUTS}")
                data = load_pickle(str(file))
                if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
                    raise DatasetLayoutError(f"{file}: expected a dict with keys 'image_data' and 'class_dict'")
                raw[s] = [
                    (make_array_ref(str(file), int(i)), str(wnid))
                    for wnid, rows in data["class_dict"].items() for i in rows
                ]
                register_pickle_array(arrays, file, "image_data", data)
            return raw, "pickle cache"
        if (base / METAOPT_FILES["train"]).is_file():
            try:
                return read_metaopt_pickles(base, METAOPT_FILES, arrays), "MetaOptNet pickles"
            except DatasetLayoutError as exc:
                raise DatasetLayoutError(f"{name}: {exc}") from None
        if all((base / s).is_dir() for s in SPLITS):
            return {s: read_class_folders(base / s) for s in SPLITS}, "class folders"
        raise missing_layout(name, base, LAYOUTS)


@DATASET_REGISTRY.register("miniImageNet")
class MiniImageNet(MiniImageNetLayout):
    """The miniImageNet release in any of the layouts of the module docstring."""
