"""Synthetic generators: determinism, atomic writing, and loading through the real loaders."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets import (
    DatasetLayoutError,
    ModalityMismatchError,
    build_dataset,
    build_fewshot_loader,
    build_reid_test_loader,
    build_reid_train_loader,
    synthetic,
)
from datasets.synthetic import MARKER, SENTINEL, generate_fewshot, generate_rgbnt, main, read_marker

REPO = Path(__file__).resolve().parents[2]

TINY_REID = dict(num_train_ids=6, num_test_ids=3, num_cams=2, images_per_id_cam=2, size=(32, 16))
TINY_FS = dict(num_classes=(6, 3, 3), images_per_class=6, size=24)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_rgbnt_deterministic_and_seeded(tmp_path):
    assert generate_rgbnt(tmp_path / "a", **TINY_REID, workers=1)
    assert generate_rgbnt(tmp_path / "b", **TINY_REID, workers=2)
    generate_rgbnt(tmp_path / "c", **TINY_REID, seed=1, workers=1)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b  # byte-identical, whatever the number of worker processes
    assert a.keys() == c.keys() and a != c
    assert len([k for k in a if k.endswith(".jpg")]) == 3 * 9 * 2 * 2


def test_rgbnt_output_loads_through_rgbnt201_loader(tmp_path):
    out = tmp_path / "syn"
    generate_rgbnt(out, **TINY_REID, workers=1)
    data = build_dataset("RGBNT201", str(out), verbose=False)
    assert (data.num_train_pids, data.num_train_cams, len(data.train)) == (6, 2, 24)
    assert sorted({pid for _, pid, _, _ in data.query}) == [7, 8, 9]
    assert len(data.query) == len(data.gallery) == 12
    assert read_marker(out)["num_train_ids"] == 6


def test_rgbnt_loaders_end_to_end(tmp_path):
    data = build_dataset("synthetic_rgbnt", str(tmp_path), **TINY_REID, verbose=False)
    assert Path(data.root) == tmp_path / "synthetic_rgbnt"
    loader = build_reid_train_loader(data.train, batch_size=8, num_instance=2, size=(32, 16), num_workers=0)
    batch = next(iter(loader))
    images, pids, masks = batch["images"], batch["pids"], batch["masks"]
    assert images["RGB"].shape == (8, 3, 32, 16) and masks.shape == (8, 3)
    assert sorted(set(Counter_values(pids))) == [2]
    test = build_reid_test_loader(data.query + data.gallery, batch_size=10, size=(32, 16), num_workers=0)
    assert sum(b["pids"].numel() for b in test) == 24


def Counter_values(pids: torch.Tensor) -> list[int]:
    return list(torch.unique(pids, return_counts=True)[1].tolist())


def test_synthetic_dataset_generates_once_and_regenerates_on_new_args(tmp_path):
    out = tmp_path / "synthetic_rgbnt"
    build_dataset("synthetic_rgbnt", str(out), **TINY_REID, verbose=False)
    stamp = (out / MARKER).stat().st_mtime_ns
    build_dataset("synthetic_rgbnt", str(out), verbose=False)  # no explicit args: keep what is there
    build_dataset("synthetic_rgbnt", str(out), **TINY_REID, verbose=False)  # same args: keep
    assert (out / MARKER).stat().st_mtime_ns == stamp
    data = build_dataset("synthetic_rgbnt", str(out), **dict(TINY_REID, num_train_ids=4), verbose=False)
    assert data.num_train_pids == 4 and read_marker(out)["num_train_ids"] == 4
    with pytest.raises(DatasetLayoutError, match="python -m datasets.synthetic"):
        build_dataset("synthetic_rgbnt", str(tmp_path / "other" / "synthetic_rgbnt"), generate=False, verbose=False)


def test_half_written_folder_is_regenerated_foreign_folder_refused(tmp_path):
    half = tmp_path / "half"
    (half / "train_171" / "RGB").mkdir(parents=True)
    (half / SENTINEL).write_text("")
    (half / "train_171" / "RGB" / "000001_cam1_0_00.jpg").write_bytes(b"partial")
    assert generate_rgbnt(half, **TINY_REID, workers=1)
    assert read_marker(half) is not None and len(list((half / "train_171" / "RGB").iterdir())) == 24
    assert not generate_rgbnt(half, **TINY_REID, workers=1)  # complete with the same arguments

    foreign = tmp_path / "RGBNT201"
    (foreign / "train_171").mkdir(parents=True)
    (foreign / "notes.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="not written by datasets.synthetic"):
        generate_rgbnt(foreign, **TINY_REID, workers=1)
    assert (foreign / "notes.txt").read_text() == "real data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_missing_modality_option(tmp_path):
    out = tmp_path / "miss"
    generate_rgbnt(out, **TINY_REID, missing_modality_prob=0.3, workers=1)
    with pytest.raises(ModalityMismatchError, match="missing"):
        build_dataset("RGBNT201", str(out), verbose=False)
    data = build_dataset("RGBNT201", str(out), allow_missing_modality=True, verbose=False)
    assert data.num_missing_modalities > 0
    loader = build_reid_test_loader(data.train, batch_size=24, size=(32, 16), num_workers=0)
    masks = next(iter(loader))["masks"]
    assert masks[:, 0].all() and not masks.all()


def test_bad_generator_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_cams must be in 1..9"):
        generate_rgbnt(tmp_path / "x", num_cams=10)
    with pytest.raises(ValueError, match="three positive counts"):
        generate_fewshot(tmp_path / "y", num_classes=(5, 0, 2))


def test_fewshot_generator_loads_through_mini_loader(tmp_path):
    assert generate_fewshot(tmp_path / "a", **TINY_FS, workers=1)
    generate_fewshot(tmp_path / "b", **TINY_FS, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    data = build_dataset("miniImageNet", str(tmp_path / "a"), verbose=False)
    assert [len(data.split_classes[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert all(len(v) == 6 * len(data.split_classes[k]) for k, v in data.splits.items())
    assert all(len(name.split()) == 3 and "_" not in name for name in data.class_names)  # "red striped triangle"
    seen = {tuple(n.split()) for n in data.class_names[:6]}
    for name in data.class_names[6:]:  # val/test classes: new combinations of seen attributes
        for k, attr in enumerate(name.split()):
            assert attr in {s[k] for s in seen}
    loader = build_fewshot_loader(data.splits["test"], train=False, n_way=3, k_shot=1, n_query=2, n_episodes=2,
                                  size=24, num_workers=0)
    episode = next(iter(loader))
    assert episode["support"].shape == (3, 3, 24, 24) and episode["query"].shape == (6, 3, 24, 24)
    assert episode["query_labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert set(episode["class_ids"].tolist()) <= set(data.split_classes["test"])


def test_synthetic_fewshot_dataset_and_cli(tmp_path, capsys):
    data = build_dataset("synthetic_fewshot", str(tmp_path), **TINY_FS, verbose=False)
    assert data.name == "synthetic_fewshot" and len(data.class_names) == 12
    out = tmp_path / "cli"
    assert main(["--kind", "fewshot", "--out", str(out), "--num-classes", "2", "2", "2",
                 "--images-per-class", "3", "--size", "16", "--workers", "1"]) == 0
    assert "wrote 18 images" in capsys.readouterr().out
    assert main(["--kind", "rgbnt", "--out", str(tmp_path / "r"), "--num-train-ids", "2", "--num-test-ids", "1",
                 "--num-cams", "2", "--images-per-id-cam", "1", "--size", "16x8", "--workers", "1"]) == 0
    assert main(["--kind", "rgbnt", "--out", str(tmp_path / "r"), "--num-train-ids", "2", "--num-test-ids", "1",
                 "--num-cams", "2", "--images-per-id-cam", "1", "--size", "16x8", "--workers", "1"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert oct((tmp_path / "r").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cli_presets_belong_to_their_kind(tmp_path, capsys):
    # "ablation" is an RGBNT preset (short GPU runs); asking for it as a few-shot set is a usage error
    with pytest.raises(SystemExit) as exit_info:
        main(["--kind", "fewshot", "--out", str(tmp_path / "f"), "--preset", "ablation"])
    assert exit_info.value.code == 2
    assert "not a fewshot preset" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["--kind", "rgbnt", "--out", str(tmp_path / "r"), "--preset", "ablation", "--num-train-ids", "2",
                 "--num-test-ids", "1", "--num-cams", "2", "--images-per-id-cam", "1", "--workers", "1"]) == 0
    marker = read_marker(tmp_path / "r")
    assert marker is not None and marker["size"] == [128, 64]  # the preset's image size was kept


def test_cli_module_reexports_the_generator_api():
    from datasets import synthetic_folder, synthetic_generators, synthetic_person, synthetic_shapes

    owners = (synthetic_folder, synthetic_generators, synthetic_person, synthetic_shapes)
    for name in synthetic.__all__:
        if name == "main":
            continue
        homes = [m for m in owners if name in vars(m)]
        assert homes and all(getattr(synthetic, name) is getattr(m, name) for m in homes), name
    assert {"render_person", "render_fewshot", "write_atomically", "RGBNT_PRESETS"} <= set(synthetic.__all__)


def _datasets_imports(module: str) -> set[str]:
    tree = ast.parse((REPO / "datasets" / f"{module}.py").read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m.removeprefix("datasets.") for m in found if m.startswith("datasets.")}


def test_synthetic_modules_import_downwards_only():
    # renderers know nothing of files; the dataset classes share helpers, never each other;
    # only the command line itself is datasets.synthetic, so ``python -m`` never imports it twice
    assert _datasets_imports("synthetic_person") == set()
    assert _datasets_imports("synthetic_shapes") == set()
    assert _datasets_imports("synthetic_folder") == {"bases"}
    assert _datasets_imports("synthetic_generators") == {"synthetic_folder", "synthetic_person", "synthetic_shapes"}
    for dataset, other in (("synthetic_rgbnt", "synthetic_fewshot"), ("synthetic_fewshot", "synthetic_rgbnt")):
        imports = _datasets_imports(dataset)
        assert other not in imports and "synthetic" not in imports
        assert {"synthetic_folder", "synthetic_generators"} <= imports


def test_cli_runs_as_a_module_without_warnings(tmp_path):
    out = tmp_path / "fs"
    cmd = [sys.executable, "-W", "error", "-m", "datasets.synthetic", "--kind", "fewshot", "--out", str(out),
           "--num-classes", "2", "1", "1", "--images-per-class", "2", "--size", "16", "--workers", "1"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote 8 images" in run.stdout and read_marker(out)["num_classes"] == [2, 1, 1]


def test_cluttered_fewshot_set_is_recorded_and_harder_to_tell_apart(tmp_path):
    """``clutter`` (the gpu_hard preset) changes the images and is recorded in the marker; a set without it keeps
    the marker (and images) it always had."""
    import numpy as np
    from PIL import Image

    from datasets.synthetic_generators import FEWSHOT_PRESETS

    assert FEWSHOT_PRESETS["gpu_hard"]["clutter"] == 1.0 and "clutter" not in FEWSHOT_PRESETS["gpu"]
    kw = dict(num_classes=(2, 1, 1), images_per_class=2, size=32, workers=1)
    generate_fewshot(tmp_path / "plain", **kw)
    generate_fewshot(tmp_path / "hard", clutter=1.0, **kw)
    assert "clutter" not in read_marker(tmp_path / "plain") and read_marker(tmp_path / "hard")["clutter"] == 1.0
    names = sorted(p.name for p in (tmp_path / "plain" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "hard" / "images").iterdir())
    differ = [not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "images" / n)),
                                 np.asarray(Image.open(tmp_path / "hard" / "images" / n))) for n in names]
    assert all(differ)
