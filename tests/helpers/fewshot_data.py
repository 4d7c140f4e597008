"""A tiny synthetic few-shot set for CPU tests: 10 images of 32x32 per class, in the miniImageNet layout."""

from __future__ import annotations

from pathlib import Path


def tiny_fewshot_set(root: Path, train_classes: int) -> Path:
    """Generate ``root/synthetic_fewshot`` with ``train_classes``/5/5 classes; returns ``root`` (the
    ``DATASETS.ROOT_DIR`` of a run on it)."""
    from datasets.synthetic import generate_fewshot

    generate_fewshot(root / "synthetic_fewshot", num_classes=(train_classes, 5, 5), images_per_class=10, size=32,
                     workers=1)
    return root
