"""Benchmark loaders, the synthetic generators, samplers and transforms, registered by name."""

from __future__ import annotations

from typing import Any

# Importing the dataset modules registers them in DATASET_REGISTRY.
from datasets import (  # noqa: F401, I001
    cifar_fs,
    cub,
    mini_imagenet,
    msvr310,
    rgbnt100,
    rgbnt201,
    synthetic_fewshot,
    synthetic_rgbnt,
    tiered_imagenet,
)
from datasets.bases import (
    MODALITIES,
    DatasetLayoutError,
    FewShotData,
    ModalityMismatchError,
    ReIDData,
)
from datasets.image_io import ArrayStore, ImageReadError, read_image
from datasets.registry import DATASET_REGISTRY

# Torch-dependent parts load on first access, so that the generator CLI
# (``python -m datasets.synthetic``) and plain parsing start without importing torch.
_LAZY = {
    "EpisodeCollate": "image_datasets", "FewShotImageDataset": "image_datasets",
    "ReIDImageDataset": "image_datasets", "fewshot_collate": "image_datasets", "reid_collate": "image_datasets",
    "build_fewshot_loader": "loader", "build_reid_test_loader": "loader", "build_reid_train_loader": "loader",
    "default_num_workers": "loader", "reid_train_loader": "loader", "reid_test_loader": "loader",
    "fewshot_train_loader": "loader", "fewshot_eval_loader": "loader",
    "EpisodeSampler": "samplers", "RandomIdentitySampler": "samplers", "ShuffledBatchSampler": "samplers",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms", "MINI_IMAGENET_MEAN": "transforms",
    "MINI_IMAGENET_STD": "transforms", "MultiModalTransform": "transforms",
    "build_fewshot_transform": "transforms", "build_reid_transform": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"datasets.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'datasets' has no attribute '{name}'")


def build_dataset(name: str, root: str, **kwargs: Any) -> ReIDData | FewShotData:
    """Parse the release registered as ``name`` under ``root``.

    ReID names (``RGBNT201``, ``RGBNT100``, ``MSVR310``, ``synthetic_rgbnt``) return a
    :class:`ReIDData` with ``.train``, ``.query``, ``.gallery`` lists of
    ``(paths: dict[str, str], pid, camid, trackid)``; few-shot names (``miniImageNet``,
    ``tieredImageNet``, ``CIFAR-FS``, ``CUB``, ``synthetic_fewshot``) a :class:`FewShotData`
    with ``.splits[name]`` lists of ``(path, label)`` and ``.class_names``. ``kwargs`` go to
    the dataset class (e.g. ``allow_missing_modality``, ``verify_images``, ``skip_corrupt``,
    ``verbose``; generator sizes for the synthetic sets).
    """
    return DATASET_REGISTRY.build(name, root=root, **kwargs)


__all__ = [
    "ArrayStore", "CLIP_MEAN", "CLIP_STD", "DATASET_REGISTRY", "DatasetLayoutError", "EpisodeCollate",
    "EpisodeSampler", "FewShotData", "FewShotImageDataset", "ImageReadError",
    "MINI_IMAGENET_MEAN", "MINI_IMAGENET_STD", "MODALITIES", "ModalityMismatchError", "MultiModalTransform",
    "RandomIdentitySampler", "ReIDData", "ReIDImageDataset", "ShuffledBatchSampler",
    "build_dataset", "build_fewshot_loader", "build_fewshot_transform", "build_reid_test_loader",
    "build_reid_train_loader", "build_reid_transform", "default_num_workers", "fewshot_collate",
    "fewshot_eval_loader", "fewshot_train_loader", "read_image", "reid_collate", "reid_test_loader",
    "reid_train_loader",
]
