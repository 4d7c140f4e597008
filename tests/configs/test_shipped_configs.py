"""Every shipped config loads, builds its model (random init) and names a data layout its loader reads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import build_dataset
from engine.config import load_config
from engine.reid import build_reid_model
from modeling import build_model
from tests.datasets.test_fewshot_layout import _png, jpeg, make_mini_csv
from tests.datasets.test_reid_layout import make_msvr310, make_rgbnt100, make_rgbnt201

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yml") if not p.name.startswith("Base-"))
REID_NAMES = {"RGBNT201", "RGBNT100", "MSVR310", "synthetic_rgbnt"}

# The published splits, counted independently of the loaders: training identities / classes.
TRAIN_CLASSES = {"miniImageNet": 64, "tieredImageNet": 351, "CIFAR-FS": 64, "CUB": 100}
# Image shape of each ReID benchmark: persons are tall (H > W), vehicles wide.
TALL = {"RGBNT201": True, "RGBNT100": False, "MSVR310": False}
# DeMo's published recipes (its configs/<BENCH>/DeMo.yml): HEAD, DIRECT, P x K, epochs, warm-up, test batch.
DEMO_RECIPES = {
    "RGBNT201": (4, True, 64, 8, 50, 10, 128),
    "RGBNT100": (8, False, 128, 16, 30, 5, 128),
    "MSVR310": (8, False, 64, 4, 50, 10, 64),
}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_benchmark_has_demo_configs_and_few_shot_configs() -> None:
    names = {_rel(p) for p in CONFIGS}
    for bench in TALL:
        assert {f"configs/{bench}/DeMo.yml", f"configs/{bench}/DeMo_SDTPS_DGAF.yml"} <= names
    for bench in TRAIN_CLASSES:
        assert f"configs/{bench}/ExpB1_SAP.yml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_builds_its_model(path: Path) -> None:
    cfg = load_config(path)
    if cfg.MODEL.get("PRETRAIN_RECIPE"):  # a tower made by a pretraining run (tests/engine/reid/test_tower_pretrain.py)
        cfg = load_config(path, ["MODEL.PRETRAIN_PATH", "", "MODEL.PRETRAIN_RECIPE", ""])
    if cfg.MODEL.get("SAP", {}).get("TEXT_TOWER_RECIPE"):  # a name tower made by its recipe (test_text_tower.py)
        cfg = load_config(path, ["MODEL.SAP.TEXT_TOWER", "", "MODEL.SAP.TEXT_TOWER_RECIPE", "",
                                 "MODEL.SAP.ANCHOR_FALLBACK", "prototype"])
    torch.manual_seed(0)
    if cfg.DATASETS.NAMES in REID_NAMES:
        assert cfg.SOLVER.IMS_PER_BATCH % cfg.DATALOADER.NUM_INSTANCE == 0
        model = build_reid_model(cfg, num_classes=7, num_cameras=3).eval()
        h, w = cfg.INPUT.SIZE_TEST
        images = {m: torch.randn(2, 3, h, w) for m in ("RGB", "NI", "TI")}
        with torch.no_grad():
            out = model(images, torch.tensor([0, 2]), None)
        assert out["feat"].shape[0] == 2 and torch.isfinite(out["feat"]).all()
    else:
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).get("FEWSHOT", {}).get("PRETRAIN", {})
                                  .get("RECIPE")], ids=_rel)
def test_a_shared_pretraining_names_a_recipe_of_the_same_network(path: Path) -> None:
    from engine.fewshot.pretrained import check_recipe

    cfg = load_config(path, ["SEED", "3"])
    recipe = check_recipe(cfg)  # refuses a recipe of more than pre-training, of another network or data
    assert recipe.SEED == 3 and "pretrain" not in cfg.FEWSHOT.STAGES


@pytest.mark.parametrize("bench", sorted(DEMO_RECIPES))
def test_demo_configs_carry_demos_recipe(bench: str) -> None:
    cfg = load_config(REPO / "configs" / bench / "DeMo.yml")
    head, direct, batch, k, epochs, warmup, test_batch = DEMO_RECIPES[bench]
    assert (cfg.MODEL.NAME, cfg.MODEL.DEMO.HEAD, cfg.MODEL.DEMO.DIRECT) == ("DeMo", head, direct)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.MAX_EPOCHS) == (batch, k, epochs)
    assert (cfg.SOLVER.WARMUP_EPOCHS, cfg.TEST.IMS_PER_BATCH) == (warmup, test_batch)
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_LR) == ("Adam", 3.5e-4, 5e-6)
    assert cfg.INPUT.PIXEL_MEAN == [0.5, 0.5, 0.5] and cfg.TEST.MISS_MODE == "zero"
    assert not cfg.LOSS.SDM.ENABLED and not cfg.LOSS.FEAT_NORM.ENABLED and cfg.SOLVER.GRAD_CLIP <= 0
    variant = load_config(REPO / "configs" / bench / "DeMo_SDTPS_DGAF.yml")
    assert variant.MODEL.NAME == "DeMo_SDTPS" and variant.MODEL.DGAF.ENABLED
    assert variant.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR and variant.INPUT.SIZE_TRAIN == cfg.INPUT.SIZE_TRAIN


def _write_release(name: str, root: Path) -> None:
    """A few files in the public release layout of ``name`` (the loaders' tests write the same)."""
    if name == "RGBNT201":
        make_rgbnt201(root)
    elif name == "RGBNT100":
        make_rgbnt100(root)
    elif name == "MSVR310":
        make_msvr310(root)
    elif name == "miniImageNet":
        make_mini_csv(root / "miniImageNet")
    elif name == "tieredImageNet":
        base = root / "tieredImageNet"
        base.mkdir()
        for split in ("train", "val", "test"):
            with open(base / f"{split}_images_png.pkl", "wb") as fh:
                pickle.dump([_png(40), _png(41)], fh)
            with open(base / f"{split}_labels.pkl", "wb") as fh:
                pickle.dump({"label_specific": np.array([0, 1]), "label_specific_str": [f"{split}a", f"{split}b"]},
                            fh)
    elif name == "CIFAR-FS":
        base = root / "CIFAR-FS"
        base.mkdir()
        for split, labels in (("train", [0, 1]), ("val", [2]), ("test", [3])):
            with open(base / f"CIFAR_FS_{split}.pickle", "wb") as fh:
                pickle.dump({"data": np.zeros((len(labels), 32, 32, 3), np.uint8), "labels": labels}, fh, protocol=2)
    elif name == "CUB":
        base = root / "CUB"
        classes = ["001.A_bird", "002.B_bird", "003.C_bird"]
        for fname, c in zip(("base.json", "val.json", "novel.json"), classes):
            jpeg(base / "images" / c / "x.jpg")
            (base / fname).write_text(json.dumps({"label_names": classes, "image_names": [f"images/{c}/x.jpg"],
                                                  "image_labels": [classes.index(c)]}))
    else:
        raise AssertionError(f"no release writer for {name}")


REAL = [p for p in CONFIGS if load_config(p).DATASETS.NAMES in {*TALL, *TRAIN_CLASSES}]


@pytest.mark.parametrize("path", REAL, ids=_rel)
def test_config_reads_its_benchmark_layout(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    name = cfg.DATASETS.NAMES
    assert cfg.DATASETS.ROOT_DIR == "data"  # the README's data folder; the loaders look for data/<name>/
    _write_release(name, tmp_path)
    data = build_dataset(name, str(tmp_path), verbose=False)
    if name in TALL:
        h, w = cfg.INPUT.SIZE_TRAIN
        assert (h > w) == TALL[name] and data.num_train_pids > 0
    else:
        assert cfg.MODEL.NUM_CLASSES == TRAIN_CLASSES[name]
        assert set(data.splits) >= {cfg.FEWSHOT.TRAIN_SPLIT, cfg.FEWSHOT.VAL_SPLIT, cfg.FEWSHOT.TEST_SPLIT}
