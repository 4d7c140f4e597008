"""Transforms: shared random geometry across modalities, missing modalities, normalisation, few-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import CLIP_MEAN, CLIP_STD, build_fewshot_transform, build_reid_transform


def asymmetric_image(h: int = 64, w: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(arr)


def test_same_random_geometry_for_all_modalities():
    tf = build_reid_transform((64, 32), train=True, padding=6, re_prob=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    img = asymmetric_image()
    reference = build_reid_transform((64, 32), train=False, mean=(0, 0, 0), std=(1, 1, 1))({"RGB": img})[0]["RGB"]
    flipped = erased = shifted = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, mask = tf({"RGB": img, "NI": img, "TI": img})
        assert mask.all()
        assert torch.equal(out["RGB"], out["NI"]) and torch.equal(out["RGB"], out["TI"])
        flipped += bool(out["RGB"][0, 30, 10] > out["RGB"][0, 30, 20])
        erased += not bool(((out["RGB"] >= 0) & (out["RGB"] <= 1)).all())  # N(0,1) erase noise leaves [0, 1]
        shifted += not torch.equal(out["RGB"], reference) and not torch.equal(out["RGB"], reference.flip(-1))
    assert 5 < flipped < 35 and 5 < erased < 35 and shifted > 10


def test_missing_modality_zero_and_mask():
    tf = build_reid_transform((32, 16), train=True)
    out, mask = tf({"RGB": asymmetric_image(), "NI": None, "TI": asymmetric_image()})
    assert mask.tolist() == [True, False, True]
    assert torch.count_nonzero(out["NI"]) == 0
    assert all(v.shape == (3, 32, 16) and v.dtype == torch.float32 for v in out.values())
    with pytest.raises(ValueError, match="at least one modality"):
        tf({"RGB": None})


def test_test_transform_resizes_and_normalises_with_clip_stats():
    tf = build_reid_transform((256, 128), train=False)
    img = Image.new("RGB", (40, 90), (255, 0, 128))
    out, _ = tf({"RGB": img, "NI": img, "TI": img})
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out["TI"].shape == (3, 256, 128)
    assert torch.allclose(out["RGB"].mean(dim=(1, 2)), expected, atol=1e-3)
    a, _ = tf({"RGB": asymmetric_image()})
    b, _ = tf({"RGB": asymmetric_image()})
    assert torch.equal(a["RGB"], b["RGB"])  # deterministic


@pytest.mark.parametrize("augmentation", ["pad_crop", "random_resized_crop"])
def test_fewshot_transforms(augmentation):
    train = build_fewshot_transform(84, train=True, augmentation=augmentation)
    test = build_fewshot_transform(84, train=False, resize_ratio=1.15)
    for img in (Image.new("RGB", (84, 84), (10, 200, 30)), Image.new("RGB", (300, 200), (10, 200, 30))):
        assert train(img).shape == (3, 84, 84) and train(img).dtype == torch.float32
        assert test(img).shape == (3, 84, 84)
    with pytest.raises(ValueError, match="unknown few-shot augmentation"):
        build_fewshot_transform(84, augmentation="mixup")
