"""Few-shot loaders: every supported layout on hand-made files, class names, bad input."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DatasetLayoutError, FewShotData, FewShotImageDataset, ImageReadError, build_dataset
from datasets.fewshot_layout import readable_name, wordnet_names

WNIDS = {"train": ["n01532829", "n01558993"], "val": ["n01855672"], "test": ["n01930112", "n01981276"]}


def jpeg(path: Path, colour=(100, 150, 200), size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def make_mini_csv(base: Path, per_class: int = 3, csv_dir: str = ".") -> Path:
    for split, wnids in WNIDS.items():
        rows = ["filename,label"]
        for w in wnids:
            for i in range(per_class):
                name = f"{w}{i + 1:08d}.jpg"
                jpeg(base / "images" / name)
                rows.append(f"{name},{w}")
        (base / csv_dir).mkdir(parents=True, exist_ok=True)
        (base / csv_dir / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return base


def test_wordnet_table_and_readable_names():
    table = wordnet_names()
    assert len(table) == 1000
    assert table["n01532829"] == "house finch"
    assert readable_name("n01930112") == "nematode"
    assert readable_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert readable_name("red_striped_triangle") == "red striped triangle"
    assert readable_name("n99999999") == "n99999999"  # unknown wnid kept


@pytest.mark.parametrize("csv_dir", [".", "split"])
def test_mini_csv_layout(tmp_path, csv_dir):
    make_mini_csv(tmp_path / "miniImageNet", csv_dir=csv_dir)
    data = build_dataset("miniImageNet", str(tmp_path), verbose=False)
    assert isinstance(data, FewShotData) and data.layout == "csv"
    assert list(data.splits) == ["train", "val", "test"]
    assert [len(v) for v in data.splits.values()] == [6, 3, 6]
    # global class ids, train first
    assert data.split_classes == {"train": [0, 1], "val": [2], "test": [3, 4]}
    assert data.class_keys == ["n01532829", "n01558993", "n01855672", "n01930112", "n01981276"]
    assert data.class_names[0] == "house finch" and data.class_names[3] == "nematode"
    path, label = data.splits["test"][0]
    assert Path(path).name == "n0193011200000001.jpg" and label == 3
    assert "train             |         2 |        6" in data.summary()


def test_mini_csv_bad_inputs(tmp_path):
    base = make_mini_csv(tmp_path / "mini")
    (base / "images" / "n0185567200000002.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val.csv: 1 listed image\(s\) not found.*n0185567200000002.jpg"):
        build_dataset("miniImageNet", str(base), verbose=False)
    jpeg(base / "images" / "n0185567200000002.jpg")
    (base / "val.csv").write_text("filename,label\n")
    with pytest.raises(DatasetLayoutError, match=r"val.csv: the split lists no image"):
        build_dataset("miniImageNet", str(base), verbose=False)
    (base / "val.csv").write_text("name,class\nx.jpg,n01855672\n")
    with pytest.raises(DatasetLayoutError, match=r"header 'filename,label'"):
        build_dataset("miniImageNet", str(base), verbose=False)
    (base / "test.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing split file.*test.csv"):
        build_dataset("miniImageNet", str(base), verbose=False)


def test_mini_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*mini-imagenet-cache"):
        build_dataset("miniImageNet", str(tmp_path / "nothing" / "miniImageNet"), verbose=False)
    (tmp_path / "miniImageNet" / "junk").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"(?s)no supported layout.*filename,label"):
        build_dataset("miniImageNet", str(tmp_path), verbose=False)


def test_mini_corrupt_image(tmp_path):
    base = make_mini_csv(tmp_path / "mini")
    bad = base / "images" / "n0193011200000002.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"n0193011200000002.jpg"):
        build_dataset("miniImageNet", str(base), verify_images=True, verbose=False)
    data = build_dataset("miniImageNet", str(base), verify_images=True, skip_corrupt=True, verbose=False)
    assert len(data.splits["test"]) == 5 and data.skipped == [str(bad)]
    data = build_dataset("miniImageNet", str(base), verbose=False)
    index = next(i for i, (p, _) in enumerate(data.splits["test"]) if p == str(bad))
    ds = FewShotImageDataset(data.splits["test"], lambda im: torch.tensor(np.asarray(im)))
    with pytest.raises(ImageReadError, match=r"n0193011200000002.jpg"):
        ds[index]
    ds = FewShotImageDataset(data.splits["test"], lambda im: torch.tensor(np.asarray(im)), skip_corrupt=True)
    assert ds[index][1] == data.splits["test"][index][1] and ds.num_skipped == 1


def _array(n: int, offset: int) -> np.ndarray:
    return np.stack([np.full((8, 8, 3), offset + i, np.uint8) for i in range(n)])


def test_mini_pickle_cache(tmp_path):
    offset = 0
    for split, wnids in WNIDS.items():
        n = 2 * len(wnids)
        class_dict = {w: [2 * j, 2 * j + 1] for j, w in enumerate(wnids)}
        with open(tmp_path / f"mini-imagenet-cache-{split}.pkl", "wb") as fh:
            pickle.dump({"image_data": _array(n, offset), "class_dict": class_dict}, fh)
        offset += 10
    data = build_dataset("miniImageNet", str(tmp_path), verbose=False)
    assert data.layout == "pickle cache"
    path, label = data.splits["val"][1]
    assert path == f"pkl://{tmp_path / 'mini-imagenet-cache-val.pkl'}#1" and data.class_keys[label] == "n01855672"
    ds = FewShotImageDataset(data.splits["val"], lambda im: torch.tensor(np.asarray(im)), arrays=data.arrays)
    img, lab = ds[1]
    assert img.shape == (8, 8, 3) and int(img[0, 0, 0]) == 10 + 1 and lab == label


def test_mini_metaoptnet_pickles(tmp_path):
    files = {"train_phase_train": ("train", [0, 0, 1, 1]), "train_phase_val": ("train", [1, 0]),
             "val": ("val", [2, 2]), "test": ("test", [3, 4, 4])}
    names = {w: i for i, w in enumerate(WNIDS["train"] + WNIDS["val"] + WNIDS["test"])}
    for key, (_, labels) in files.items():
        with open(tmp_path / f"miniImageNet_category_split_{key}.pickle", "wb") as fh:
            pickle.dump({"data": _array(len(labels), 0), "labels": labels, "catname2label": names}, fh, protocol=2)
    data = build_dataset("miniImageNet", str(tmp_path), verbose=False)
    assert data.layout == "MetaOptNet pickles"
    assert list(data.splits) == ["train", "val", "test", "train_phase_val"]
    assert data.class_keys[:2] == ["n01532829", "n01558993"]
    assert data.split_classes["train_phase_val"] == [0, 1]  # same classes as train
    assert [data.class_keys[lab] for _, lab in data.splits["test"]] == ["n01930112", "n01981276", "n01981276"]


def test_mini_class_folders(tmp_path):
    for split, wnids in WNIDS.items():
        for w in wnids:
            for i in range(2):
                jpeg(tmp_path / split / w / f"{w}_{i}.jpg")
    data = build_dataset("miniImageNet", str(tmp_path), verbose=False)
    assert data.layout == "class folders" and data.class_names[2] == readable_name("n01855672")
    assert [len(v) for v in data.splits.values()] == [4, 2, 4]


def _png(value: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (value, value, value)).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_tiered_original_png_pickles(tmp_path):
    base = tmp_path / "tiered-imagenet"
    base.mkdir()
    for split, wnids in WNIDS.items():
        ids = [0, 0, len(wnids) - 1]
        with open(base / f"{split}_images_png.pkl", "wb") as fh:
            pickle.dump([_png(40 + i) for i in range(len(ids))], fh)
        with open(base / f"{split}_labels.pkl", "wb") as fh:
            pickle.dump({"label_specific": np.array(ids), "label_specific_str": wnids,
                         "label_general": np.zeros(3, int), "label_general_str": ["x"]}, fh)
    data = build_dataset("tieredImageNet", str(tmp_path), verbose=False)
    assert data.layout == "png pickles"
    assert [data.class_keys[lab] for _, lab in data.splits["train"]] == ["n01532829", "n01532829", "n01558993"]
    assert data.class_names[0] == "house finch"
    img, _ = FewShotImageDataset(data.splits["test"], lambda im: np.asarray(im), arrays=data.arrays)[2]
    assert img.shape == (6, 6, 3) and int(img[0, 0, 0]) == 42


def test_tiered_npz_and_errors(tmp_path):
    for split, labels in (("train", [0, 1, 1]), ("val", [5, 5]), ("test", [9, 8])):
        np.savez(tmp_path / f"{split}_images.npz", images=_array(len(labels), 0))
        with open(tmp_path / f"{split}_labels.pkl", "wb") as fh:
            pickle.dump({"labels": labels}, fh)
    data = build_dataset("tieredImageNet", str(tmp_path), verbose=False)
    assert data.layout == "npz" and data.class_keys == ["label0", "label1", "label5", "label9", "label8"]
    img, _ = FewShotImageDataset(data.splits["train"], lambda im: np.asarray(im), arrays=data.arrays)[2]
    assert int(img[0, 0, 0]) == 2
    (tmp_path / "test_labels.pkl").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing split file.*test_labels.pkl"):
        build_dataset("tieredImageNet", str(tmp_path), verbose=False)


def test_cifar_fs_pickles_and_bertinetto(tmp_path):
    pk = tmp_path / "pk" / "CIFAR-FS"
    pk.mkdir(parents=True)
    for split, labels in (("train", [0, 0, 1]), ("val", [2]), ("test", [99, 3])):
        with open(pk / f"CIFAR_FS_{split}.pickle", "wb") as fh:
            pickle.dump({"data": _array(len(labels), 0), "labels": labels}, fh, protocol=2)
    data = build_dataset("CIFAR-FS", str(tmp_path / "pk"), verbose=False)
    assert data.layout == "MetaOptNet pickles"
    assert data.class_names == ["apple", "aquarium fish", "baby", "worm", "bear"]
    data = build_dataset("CIFAR-FS", str(tmp_path / "pk"), cifar100_names=False, verbose=False)
    assert data.class_keys[0] == "label0"

    bt = tmp_path / "bt" / "cifar100"
    for split, classes in (("train", ["apple", "baby"]), ("val", ["bed"]), ("test", ["sweet_pepper"])):
        (bt / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
        (bt / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(classes) + "\n")
        for c in classes:
            for i in range(2):
                jpeg(bt / "data" / c / f"{i}.png")
    data = build_dataset("CIFAR-FS", str(tmp_path / "bt"), verbose=False)
    assert data.layout == "bertinetto class lists" and data.class_names[-1] == "sweet pepper"
    assert [len(v) for v in data.splits.values()] == [4, 2, 2]
    (bt / "splits" / "bertinetto" / "val.txt").write_text("bed\nnot_a_class\n")
    with pytest.raises(DatasetLayoutError, match=r"not_a_class"):
        build_dataset("CIFAR-FS", str(tmp_path / "bt"), verbose=False)


def test_cub_closerlook_json_reroots_stale_paths(tmp_path):
    base = tmp_path / "CUB"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
    for c in classes:
        for i in range(2):
            jpeg(base / "images" / c / f"{c.split('.')[1]}_{i:04d}.jpg")
    for fname, cls in (("base.json", classes[:2]), ("val.json", classes[2:3]), ("novel.json", classes[3:])):
        names, labels = [], []
        for c in cls:
            for i in range(2):
                names.append(f"/home/someone/filelists/CUB/CUB_200_2011/images/{c}/{c.split('.')[1]}_{i:04d}.jpg")
                labels.append(classes.index(c))
        (base / fname).write_text(json.dumps({"label_names": classes, "image_names": names, "image_labels": labels}))
    data = build_dataset("CUB", str(tmp_path), verbose=False)
    assert data.layout == "CloserLook json"
    assert data.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani"]
    assert all(Path(p).is_file() for p, _ in data.splits["train"])
    (base / "images" / classes[3] / "Groove_billed_Ani_0001.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"novel.json.*Groove_billed_Ani_0001.jpg"):
        build_dataset("CUB", str(tmp_path), verbose=False)


def test_cub_easyfsl_json_and_csv(tmp_path):
    base = tmp_path / "easy"
    for split, cls in (("train", ["001.A_bird"]), ("val", ["002.B_bird"]), ("test", ["003.C_bird"])):
        for c in cls:
            jpeg(base / "images" / c / "x.jpg")
        (base / f"{split}.json").write_text(json.dumps({"class_names": cls, "class_roots": [f"images/{c}" for c in cls]}))
    data = build_dataset("CUB", str(base), verbose=False)
    assert data.layout == "easyfsl json" and data.class_names == ["A bird", "B bird", "C bird"]

    csvb = tmp_path / "feat"
    for split, c in (("train", "001.A_bird"), ("val", "002.B_bird"), ("test", "003.C_bird")):
        jpeg(csvb / "images" / c / "img_1.jpg")
        (csvb / "split").mkdir(parents=True, exist_ok=True)
        (csvb / "split" / f"{split}.csv").write_text(f"filename,label\nimg_1.jpg,{c}\n")
    data = build_dataset("CUB", str(csvb), verbose=False)
    assert data.layout == "csv" and data.class_names[1] == "B bird"
