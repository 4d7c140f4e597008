"""ReID loaders: parsing of the released layouts on hand-made file names, bad input, torch dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (
    DatasetLayoutError,
    ImageReadError,
    ModalityMismatchError,
    ReIDData,
    ReIDImageDataset,
    build_dataset,
    build_reid_transform,
    reid_collate,
)
from utils.registry import NotImplementedYetError


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def jpeg(path: Path, colour=(128, 128, 128), size=(16, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


RGBNT201_TRAIN = ["000001_cam1_0_00.jpg", "000001_cam3_1_02.jpg", "000005_cam2_0_00.jpg", "000012_cam4_0_01.jpg"]
RGBNT201_TEST = ["000180_cam1_0_00.jpg", "000180_cam2_0_00.jpg", "000199_cam4_1_03.jpg"]


def make_rgbnt201(root: Path, writer=touch, train=RGBNT201_TRAIN, test=RGBNT201_TEST) -> Path:
    base = root / "RGBNT201"
    for split, names in (("train_171", train), ("test", test)):
        for m in ("RGB", "NI", "TI"):
            for n in names:
                writer(base / split / m / n)
    return base


# ----------------------------------------------------------------------------- RGBNT201


def test_rgbnt201_parses_ids_cams_and_splits(tmp_path):
    base = make_rgbnt201(tmp_path)
    data = build_dataset("RGBNT201", str(tmp_path), verbose=False)
    assert isinstance(data, ReIDData)
    train = sorted((p["RGB"].split("/")[-1], pid, cam, tr) for p, pid, cam, tr in data.train)
    # raw ids 1, 5, 12 -> 0, 1, 2 (ascending); cam<c> -> c-1; trackid -1
    assert train == [
        ("000001_cam1_0_00.jpg", 0, 0, -1), ("000001_cam3_1_02.jpg", 0, 2, -1),
        ("000005_cam2_0_00.jpg", 1, 1, -1), ("000012_cam4_0_01.jpg", 2, 3, -1),
    ]
    # query and gallery are both the whole test folder, raw ids kept
    for split in (data.query, data.gallery):
        assert sorted((pid, cam) for _, pid, cam, _ in split) == [(180, 0), (180, 1), (199, 3)]
    paths = data.train[0][0]
    assert set(paths) == {"RGB", "NI", "TI"}
    assert paths["NI"] == str(base / "train_171" / "NI" / Path(paths["RGB"]).name)
    assert (data.num_train_pids, data.num_train_cams, data.num_train_views) == (3, 4, 1)
    table = data.summary()
    assert "train    |     3 |        4 |         4" in table
    assert "query    |     2 |        3 |         3" in table


def test_rgbnt201_accepts_release_folder_itself(tmp_path):
    base = make_rgbnt201(tmp_path)
    assert len(build_dataset("RGBNT201", str(base), verbose=False).train) == 4


def test_rgbnt201_missing_root_and_split_name_the_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*train_171/\{RGB,NI,TI\}"):
        build_dataset("RGBNT201", str(tmp_path / "nowhere"), verbose=False)
    (tmp_path / "RGBNT201" / "train_171").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"(?s)RGBNT201/test' does not exist.*Expected layout"):
        build_dataset("RGBNT201", str(tmp_path), verbose=False)


def test_rgbnt201_mismatched_names_listed(tmp_path):
    base = make_rgbnt201(tmp_path)
    touch(base / "test" / "NI" / "000181_cam1_0_00.jpg")
    with pytest.raises(ModalityMismatchError, match=r"no RGB counterpart.*NI/000181_cam1_0_00.jpg"):
        build_dataset("RGBNT201", str(tmp_path), verbose=False)


def test_rgbnt201_missing_modality_error_or_mask(tmp_path):
    base = make_rgbnt201(tmp_path, writer=jpeg)
    missing = base / "train_171" / "TI" / "000005_cam2_0_00.jpg"
    missing.unlink()
    with pytest.raises(ModalityMismatchError, match=r"missing.*TI/000005_cam2_0_00.jpg.*allow_missing_modality"):
        build_dataset("RGBNT201", str(tmp_path), verbose=False)
    data = build_dataset("RGBNT201", str(tmp_path), allow_missing_modality=True, verbose=False)
    assert data.num_missing_modalities == 1
    item = next(it for it in data.train if it[0]["RGB"].endswith("000005_cam2_0_00.jpg"))
    assert set(item[0]) == {"RGB", "NI"}
    ds = ReIDImageDataset([item], build_reid_transform((32, 16), train=False))
    images, pid, camid, trackid, mask = ds[0]
    assert mask.tolist() == [True, True, False]
    assert torch.count_nonzero(images["TI"]) == 0 and torch.count_nonzero(images["RGB"]) > 0
    assert "missing modality" in data.summary()


def test_rgbnt201_bad_name_names_the_file(tmp_path):
    make_rgbnt201(tmp_path, train=RGBNT201_TRAIN + ["badname.jpg"])
    with pytest.raises(ValueError, match=r"badname.jpg"):
        build_dataset("RGBNT201", str(tmp_path), verbose=False)


def test_corrupt_image_at_parse_time(tmp_path):
    base = make_rgbnt201(tmp_path, writer=jpeg)
    bad = base / "test" / "NI" / "000199_cam4_1_03.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert len(build_dataset("RGBNT201", str(tmp_path), verbose=False).query) == 3  # no decoding by default
    with pytest.raises(ImageReadError, match=r"000199_cam4_1_03.jpg"):
        build_dataset("RGBNT201", str(tmp_path), verify_images=True, verbose=False)
    data = build_dataset("RGBNT201", str(tmp_path), verify_images=True, skip_corrupt=True, verbose=False)
    assert len(data.query) == len(data.gallery) == 2
    assert data.skipped == [str(bad)]
    assert "unreadable images skipped: 1" in data.summary()


def test_corrupt_image_at_read_time(tmp_path):
    base = make_rgbnt201(tmp_path, writer=jpeg)
    bad = base / "train_171" / "RGB" / "000001_cam1_0_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    data = build_dataset("RGBNT201", str(tmp_path), verbose=False)
    index = next(i for i, it in enumerate(data.train) if it[0]["RGB"] == str(bad))
    tf = build_reid_transform((32, 16), train=False)
    with pytest.raises(ImageReadError, match=r"000001_cam1_0_00.jpg"):
        ReIDImageDataset(data.train, tf)[index]
    ds = ReIDImageDataset(data.train, tf, skip_corrupt=True)
    images, pid, camid, _, mask = ds[index]
    assert (pid, camid) == (data.train[index][1], data.train[index][2])  # labels of the requested sample
    assert ds.num_skipped == 1 and mask.all()


def test_reid_collate_shapes(tmp_path):
    make_rgbnt201(tmp_path, writer=jpeg)
    data = build_dataset("RGBNT201", str(tmp_path), verbose=False)
    ds = ReIDImageDataset(data.train, build_reid_transform((32, 16), train=True, padding=2))
    batch = reid_collate([ds[i] for i in range(len(ds))])
    images, pids, camids, trackids, masks = (batch[k] for k in ("images", "pids", "camids", "trackids", "masks"))
    assert set(images) == {"RGB", "NI", "TI"}
    assert all(v.shape == (4, 3, 32, 16) and v.dtype == torch.float32 for v in images.values())
    assert pids.dtype == torch.int64 and pids.shape == (4,) and trackids.tolist() == [-1] * 4
    assert masks.shape == (4, 3) and masks.dtype == torch.bool and masks.all()
    assert sorted(camids.tolist()) == [0, 1, 2, 3]


def test_unknown_dataset_lists_registered():
    with pytest.raises(NotImplementedYetError, match=r"RGBNT201"):
        build_dataset("Market1501", "data")


# ----------------------------------------------------------------------------- RGBNT100


def make_rgbnt100(root: Path, writer=touch) -> Path:
    base = root / "RGBNT100" / "rgbir"
    for split, names in {
        "bounding_box_train": ["0003_c001_00001.jpg", "0003_c004_00002.jpg", "0010_c008_00001.jpg"],
        "query": ["0051_c002_00001.jpg"],
        "bounding_box_test": ["0051_c005_00003.jpg", "0060_c001_00001.jpg"],
    }.items():
        for n in names:
            writer(base / split / n)
    return base


def test_rgbnt100_parses_ids_cams_and_crops(tmp_path):
    base = make_rgbnt100(tmp_path)
    data = build_dataset("RGBNT100", str(tmp_path), verbose=False)
    assert sorted((pid, cam) for _, pid, cam, _ in data.train) == [(0, 0), (0, 3), (1, 7)]
    assert [(pid, cam) for _, pid, cam, _ in data.query] == [(51, 1)]
    assert sorted((pid, cam) for _, pid, cam, _ in data.gallery) == [(51, 4), (60, 0)]
    paths = data.query[0][0]
    file = str(base / "query" / "0051_c002_00001.jpg")
    assert paths == {"RGB": f"{file}#crop=0,0,256,128", "NI": f"{file}#crop=256,0,512,128",
                     "TI": f"{file}#crop=512,0,768,128"}


def test_rgbnt100_reads_the_three_side_by_side_parts(tmp_path):
    base = make_rgbnt100(tmp_path)
    strip = np.zeros((128, 768, 3), np.uint8)
    strip[:, :256] = (250, 0, 0)
    strip[:, 256:512] = (0, 250, 0)
    strip[:, 512:] = (0, 0, 250)
    Image.fromarray(strip).save(base / "query" / "0051_c002_00001.jpg", quality=95)
    data = build_dataset("RGBNT100", str(tmp_path), verbose=False)
    tf = build_reid_transform((128, 256), train=False, mean=(0, 0, 0), std=(1, 1, 1))
    images, *_ , mask = ReIDImageDataset(data.query, tf)[0]
    for m, channel in (("RGB", 0), ("NI", 1), ("TI", 2)):
        means = images[m].mean(dim=(1, 2))
        assert int(means.argmax()) == channel and means[channel] > 0.9
    assert mask.all()


def test_rgbnt100_out_of_range_names(tmp_path):
    base = make_rgbnt100(tmp_path)
    touch(base / "query" / "0052_c009_00001.jpg")
    with pytest.raises(ValueError, match=r"0052_c009_00001.jpg"):
        build_dataset("RGBNT100", str(tmp_path), verbose=False)


def test_rgbnt100_missing_split(tmp_path):
    base = make_rgbnt100(tmp_path)
    for f in (base / "query").iterdir():
        f.unlink()
    (base / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)rgbir/query' does not exist.*bounding_box_train"):
        build_dataset("RGBNT100", str(tmp_path), verbose=False)


# ----------------------------------------------------------------------------- MSVR310


def make_msvr310(root: Path, writer=touch) -> Path:
    base = root / "MSVR310"
    layout = {
        "bounding_box_train": {"0013": ["0013_s021_v2_004.jpg", "0013_s022_v5_001.jpg"], "0007": ["0007_s003_v0_010.jpg"]},
        "query3": {"0200": ["0200_s101_v1_000.jpg"]},
        "bounding_box_test": {"0200": ["0200_s101_v3_002.jpg"], "0201": ["0201_s104_v7_000.jpg"]},
    }
    for split, vids in layout.items():
        for vid, names in vids.items():
            for sub in ("vis", "ni", "th"):
                for n in names:
                    writer(base / split / vid / sub / n)
    return base


def test_msvr310_parses_vid_cam_scene(tmp_path):
    base = make_msvr310(tmp_path)
    data = build_dataset("MSVR310", str(tmp_path), verbose=False)
    # vehicle folders 7, 13 -> 0, 1; camid = name[11] (already 0-based); trackid = scene name[6:9]
    assert sorted((pid, cam, tr) for _, pid, cam, tr in data.train) == [(0, 0, 3), (1, 2, 21), (1, 5, 22)]
    assert [(pid, cam, tr) for _, pid, cam, tr in data.query] == [(200, 1, 101)]
    assert sorted((pid, cam, tr) for _, pid, cam, tr in data.gallery) == [(200, 3, 101), (201, 7, 104)]
    paths = data.query[0][0]
    assert paths["RGB"].endswith("query3/0200/vis/0200_s101_v1_000.jpg")
    assert paths["NI"].endswith("query3/0200/ni/0200_s101_v1_000.jpg")
    assert paths["TI"].endswith("query3/0200/th/0200_s101_v1_000.jpg")
    assert data.num_train_views == 3
    assert base.is_dir()


def test_msvr310_bad_inputs(tmp_path):
    base = make_msvr310(tmp_path)
    touch(base / "query3" / "0200" / "vis" / "0200_s101_v8_001.jpg")
    touch(base / "query3" / "0200" / "ni" / "0200_s101_v8_001.jpg")
    touch(base / "query3" / "0200" / "th" / "0200_s101_v8_001.jpg")
    with pytest.raises(ValueError, match=r"0200_s101_v8_001.jpg"):
        build_dataset("MSVR310", str(tmp_path), verbose=False)
    for sub in ("vis", "ni", "th"):
        (base / "query3" / "0200" / sub / "0200_s101_v8_001.jpg").unlink()
    (base / "query3" / "0200" / "th" / "0200_s101_v1_000.jpg").unlink()
    with pytest.raises(ModalityMismatchError, match=r"th/0200_s101_v1_000.jpg"):
        build_dataset("MSVR310", str(tmp_path), verbose=False)
    data = build_dataset("MSVR310", str(tmp_path), allow_missing_modality=True, verbose=False)
    assert set(data.query[0][0]) == {"RGB", "NI"}
    (base / "bounding_box_train" / "junk").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"integer-named folder"):
        build_dataset("MSVR310", str(tmp_path), allow_missing_modality=True, verbose=False)


def test_msvr310_vehicle_folder_mismatch(tmp_path):
    base = make_msvr310(tmp_path)
    for sub in ("vis", "ni", "th"):
        touch(base / "bounding_box_train" / "0007" / sub / "0008_s003_v1_000.jpg")
    with pytest.raises(ValueError, match=r"0008_s003_v1_000.jpg.*folder '0007'"):
        build_dataset("MSVR310", str(tmp_path), verbose=False)


# ----------------------------------------------------------------------------- augmentation draws


def _same_image_three_times() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8))
    return {"RGB": img, "NI": img.copy(), "TI": img.copy()}


def _draw(per_modality: bool, seed: int) -> dict[str, torch.Tensor]:
    tf = build_reid_transform((32, 16), train=True, padding=4, re_prob=0.5, per_modality=per_modality)
    torch.manual_seed(seed)
    return tf(_same_image_three_times())[0]


def test_shared_draws_transform_every_modality_alike():
    for seed in range(8):
        out = _draw(False, seed)
        assert torch.equal(out["RGB"], out["NI"]) and torch.equal(out["RGB"], out["TI"])


def test_per_modality_draws_differ_across_modalities_and_repeat_by_seed():
    differ = 0
    for seed in range(8):
        out = _draw(True, seed)
        assert all(torch.equal(out[m], _draw(True, seed)[m]) for m in out)  # a sample's seed decides its draws
        differ += not torch.equal(out["RGB"], out["NI"]) or not torch.equal(out["NI"], out["TI"])
    assert differ == 8  # flip, crop and erasing all drawn per modality: some part differs in every sample


def test_test_resize_interpolation_is_pil_s():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (61, 29, 3), dtype=np.uint8))
    for name, mode in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        tf = build_reid_transform((32, 16), train=False, mean=(0, 0, 0), std=(1, 1, 1), interpolation=name)
        got = tf({"RGB": img, "NI": img, "TI": img})[0]["RGB"]
        want = torch.from_numpy(np.array(img.resize((16, 32), mode))).permute(2, 0, 1).float() / 255
        assert torch.allclose(got, want, atol=1e-6), name
    with pytest.raises(ValueError, match="interpolation"):
        build_reid_transform((32, 16), train=False, interpolation="nearest")
