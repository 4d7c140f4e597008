"""``synthetic_rgbnt``: the procedurally drawn multi-modal ReID set, read with the RGBNT201 parser.

The folder is written by :func:`datasets.synthetic_generators.generate_rgbnt` (the persons
are drawn by :mod:`datasets.synthetic_person`) in the RGBNT201 layout; when it is absent or
incomplete (no ``.complete`` marker) it is generated on the spot, which takes a few seconds
for the default size.
"""

from __future__ import annotations

from datasets.registry import DATASET_REGISTRY
from datasets.rgbnt201 import RGBNT201Layout
from datasets.synthetic_folder import ensure_generated, requested_args, synthetic_dir
from datasets.synthetic_generators import RGBNT_PRESETS, generate_rgbnt


@DATASET_REGISTRY.register("synthetic_rgbnt")
class SyntheticRGBNT(RGBNT201Layout):
    """Synthetic RGB/NI/TI persons in the RGBNT201 layout, generated when absent."""

    dataset_name = "synthetic_rgbnt"
    dir_names = ("synthetic_rgbnt",)

    def __init__(
        self,
        root: str,
        *,
        generate: bool = True,
        preset: str | None = None,
        seed: int | None = None,
        num_train_ids: int | None = None,
        num_test_ids: int | None = None,
        num_cams: int | None = None,
        images_per_id_cam: int | None = None,
        size: tuple[int, int] | None = None,
        missing_modality_prob: float | None = None,
        allow_missing_modality: bool = False,
        verify_images: bool = False,
        skip_corrupt: bool = False,
        verbose: bool = True,
    ) -> None:
        """Read (generating first if needed) the synthetic set under ``root``.

        ``root`` is the generator's output folder, or its parent (then the folder is
        ``root/synthetic_rgbnt``). Generator arguments left ``None`` take the ``preset``
        values (``'small'`` by default; ``'gpu'`` for hundreds of ids); when any is given, an
        existing folder generated with other arguments is regenerated. The remaining
        arguments are those of :class:`datasets.rgbnt201.RGBNT201`.
        """
        overrides = dict(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_cams=num_cams,
                         images_per_id_cam=images_per_id_cam, size=size, seed=seed,
                         missing_modality_prob=missing_modality_prob)
        requested, explicit = requested_args(self.dataset_name, RGBNT_PRESETS, preset, overrides,
                                             seed=0, missing_modality_prob=0.0)
        base = synthetic_dir(root, self.dataset_name)
        ensure_generated(base, "rgbnt", requested, explicit, generate, generate_rgbnt)
        super().__init__(str(base), allow_missing_modality=allow_missing_modality, verify_images=verify_images,
                         skip_corrupt=skip_corrupt, verbose=verbose)
