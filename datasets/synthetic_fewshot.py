"""``synthetic_fewshot``: the procedurally drawn few-shot set, read with the miniImageNet parser.

The folder is written by :func:`datasets.synthetic_generators.generate_fewshot` (coloured,
patterned shapes drawn by :mod:`datasets.synthetic_shapes`; class names such as ``red striped
triangle``) in the miniImageNet CSV layout, and generated on the spot when absent or incomplete.
"""

from __future__ import annotations

from datasets.mini_imagenet import MiniImageNetLayout
from datasets.registry import DATASET_REGISTRY
from datasets.synthetic_folder import ensure_generated, requested_args, synthetic_dir
from datasets.synthetic_generators import FEWSHOT_PRESETS, generate_fewshot


@DATASET_REGISTRY.register("synthetic_fewshot")
class SyntheticFewShot(MiniImageNetLayout):
    """Synthetic shape classes in the miniImageNet CSV layout, generated when absent."""

    dataset_name = "synthetic_fewshot"
    dir_names = ("synthetic_fewshot",)

    def __init__(
        self,
        root: str,
        *,
        generate: bool = True,
        preset: str | None = None,
        seed: int | None = None,
        num_classes: tuple[int, int, int] | None = None,
        images_per_class: int | None = None,
        size: int | None = None,
        verify_images: bool = False,
        skip_corrupt: bool = False,
        verbose: bool = True,
    ) -> None:
        """Read (generating first if needed) the synthetic few-shot set under ``root``.

        ``root`` is the generator's output folder or its parent (then ``root/synthetic_fewshot``).
        Generator arguments left ``None`` take the ``preset`` values (``'small'``: 64/16/20
        classes of 30 images at 84x84; ``'gpu'``: 600 images per class).
        """
        overrides = dict(num_classes=num_classes, images_per_class=images_per_class, size=size, seed=seed)
        requested, explicit = requested_args(self.dataset_name, FEWSHOT_PRESETS, preset, overrides, seed=0)
        base = synthetic_dir(root, self.dataset_name)
        ensure_generated(base, "fewshot", requested, explicit, generate, generate_fewshot)
        super().__init__(str(base), verify_images=verify_images, skip_corrupt=skip_corrupt, verbose=verbose)
