"""``synthetic_rgbnt``: the procedurally drawn multi-modal ReID set, read with the RGBNT201 parser.

The folder is written by :func:`datasets.synthetic.generate_rgbnt` (see that module for
what is drawn) in the RGBNT201 layout; when it is absent or incomplete (no ``.complete``
marker) it is generated on the spot, which takes a few seconds for the default size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from datasets.bases import DatasetLayoutError
from datasets.registry import DATASET_REGISTRY
from datasets.rgbnt201 import RGBNT201Layout

logger = logging.getLogger(__name__)


def synthetic_dir(root: str, default_name: str) -> Path:
    """The generator folder: ``root`` itself if it is one (marker present or named
    ``default_name``), else ``root/default_name``."""
    from datasets.synthetic import MARKER, SENTINEL

    root_path = Path(root).expanduser()
    if (root_path / MARKER).exists() or (root_path / SENTINEL).exists() or root_path.name == default_name:
        return root_path
    return root_path / default_name


def requested_args(
    name: str, presets: dict[str, dict], preset: str | None, overrides: dict, **defaults: object
) -> tuple[dict, bool]:
    """Generator arguments of a synthetic set: the ``preset``'s (``'small'`` if ``None``), then
    ``defaults``, then the ``overrides`` that are not ``None``; and whether any was given explicitly."""
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown {name} preset '{preset}' (choose from {sorted(presets)})")
    explicit = preset is not None or any(v is not None for v in overrides.values())
    requested = dict(presets[preset or "small"], **defaults)
    requested.update({k: v for k, v in overrides.items() if v is not None})
    return requested, explicit


def ensure_generated(
    base: Path, kind: str, requested: dict, explicit: bool, generate: bool, fn: Callable[..., bool]
) -> None:
    """Generate ``base`` with ``fn(base, **requested)`` unless a complete folder is there.

    A complete folder is kept as it is unless generator arguments were given explicitly
    (``explicit``) and differ from the ones recorded in its marker.
    """
    from datasets.synthetic import read_marker

    marker = read_marker(base)
    if marker is not None and not explicit:
        return
    if marker is not None:
        recorded = {k: marker.get(k) for k in requested}
        wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in requested.items()}
        if recorded == wanted:
            return
    if not generate:
        raise DatasetLayoutError(
            f"{base} holds no complete synthetic data set; run "
            f"'python -m datasets.synthetic --kind {kind} --out {base}' or pass generate=True"
        )
    start = time.perf_counter()
    fn(base, **requested)
    logger.info("generated synthetic %s data in %s (%.1f s)", kind, base, time.perf_counter() - start)


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
        from datasets.synthetic import RGBNT_PRESETS, generate_rgbnt

        overrides = dict(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_cams=num_cams,
                         images_per_id_cam=images_per_id_cam, size=size, seed=seed,
                         missing_modality_prob=missing_modality_prob)
        requested, explicit = requested_args(self.dataset_name, RGBNT_PRESETS, preset, overrides,
                                             seed=0, missing_modality_prob=0.0)
        base = synthetic_dir(root, self.dataset_name)
        ensure_generated(base, "rgbnt", requested, explicit, generate, generate_rgbnt)
        super().__init__(str(base), allow_missing_modality=allow_missing_modality, verify_images=verify_images,
                         skip_corrupt=skip_corrupt, verbose=verbose)
