"""The dataset registry: configs name a dataset (``DATASETS.NAMES``), code looks it up here."""

from __future__ import annotations

from utils.registry import Registry

#: name -> dataset class; ``DATASET_REGISTRY.get(name)(root=..., **kwargs)`` parses a release.
DATASET_REGISTRY = Registry("dataset")
