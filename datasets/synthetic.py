"""Synthetic data sets written in the on-disk formats of the real benchmarks.

No benchmark can be downloaded on a fresh machine, so this command draws small data sets
procedurally and writes them exactly as the releases are laid out, so the real loaders
read them and every command runs end to end:

* ``--kind rgbnt``: multi-modal person ReID (RGB, NI, TI) in the RGBNT201 layout;
  :mod:`datasets.synthetic_person` draws the persons and cameras.
* ``--kind fewshot``: 100 classes ("red striped triangle") of coloured, patterned shapes,
  split 64/16/20, in the miniImageNet CSV layout; :mod:`datasets.synthetic_shapes` draws them.

:mod:`datasets.synthetic_generators` writes both layouts (seeded, byte-deterministic) and
holds the presets; :mod:`datasets.synthetic_folder` writes a folder atomically and marks it
complete last. This module is the command line and re-exports the public names of those
modules.

Command line::

    python -m datasets.synthetic --kind rgbnt --out data/synthetic_rgbnt [--preset gpu] \
        [--num-train-ids 40 --num-test-ids 20 --num-cams 4 --images-per-id-cam 4 --size 128x64 --seed 0]
    python -m datasets.synthetic --kind fewshot --out data/synthetic_fewshot [--preset gpu] \
        [--images-per-class 30 --size 84 --seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import time

from datasets.synthetic_folder import MARKER, SENTINEL, read_marker, write_atomically
from datasets.synthetic_generators import (
    FEWSHOT_PRESETS,
    GENERATOR_VERSION,
    JPEG_QUALITY,
    RGBNT_PRESETS,
    default_workers,
    generate_fewshot,
    generate_rgbnt,
)
from datasets.synthetic_person import (
    ATTRIBUTE_GROUPS,
    BAG_L,
    BG,
    HAIR,
    HAIR_L,
    HAT_L,
    LOWER_L,
    NUM_LABELS,
    PACK_L,
    PALETTE,
    SCARF_L,
    SHOES_L,
    SIBLING_PROB,
    SKIN,
    SKIN_L,
    THERMAL_PALETTE,
    UPPER_L,
    UPPER_PATTERNS,
    draw_camera,
    draw_identity,
    render_person,
)
from datasets.synthetic_shapes import (
    FS_COLOURS,
    FS_PATTERNS,
    FS_SHAPES,
    class_label,
    fewshot_classes,
    render_fewshot,
)

__all__ = [
    "ATTRIBUTE_GROUPS", "BAG_L", "BG", "FEWSHOT_PRESETS", "FS_COLOURS", "FS_PATTERNS", "FS_SHAPES",
    "GENERATOR_VERSION", "HAIR", "HAIR_L", "HAT_L", "JPEG_QUALITY", "LOWER_L", "MARKER", "NUM_LABELS",
    "PACK_L", "PALETTE", "RGBNT_PRESETS", "SCARF_L", "SENTINEL", "SHOES_L", "SIBLING_PROB", "SKIN", "SKIN_L",
    "THERMAL_PALETTE", "UPPER_L", "UPPER_PATTERNS", "class_label", "default_workers", "draw_camera",
    "draw_identity", "fewshot_classes", "generate_fewshot", "generate_rgbnt", "main", "read_marker",
    "render_fewshot", "render_person", "write_atomically",
]


def _parse_size(text: str) -> tuple[int, int]:
    """``--size``: ``HxW`` (``128x64``) or one side for a square (``84``), as (height, width)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"size must look like 128x64 (height x width) or 84, got '{text}'")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("rgbnt", "fewshot"), required=True)
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--preset", choices=sorted({*RGBNT_PRESETS, *FEWSHOT_PRESETS}), default="small",
                        help="small: CPU tests (default); gpu: hundreds of ids / 600 images per class; "
                             "ablation (rgbnt): 100/60 ids at 128x64 for many short GPU runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=None, help="HxW for rgbnt (128x64), side for fewshot (84)")
    parser.add_argument("--num-train-ids", type=int)
    parser.add_argument("--num-test-ids", type=int)
    parser.add_argument("--num-cams", type=int)
    parser.add_argument("--images-per-id-cam", type=int)
    parser.add_argument("--missing-modality-prob", type=float, default=0.0)
    parser.add_argument("--num-classes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--images-per-class", type=int)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core for big sets)")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)

    presets = RGBNT_PRESETS if args.kind == "rgbnt" else FEWSHOT_PRESETS
    if args.preset not in presets:
        parser.error(f"--preset {args.preset} is not a {args.kind} preset (choose from {sorted(presets)})")
    start = time.perf_counter()
    if args.kind == "rgbnt":
        kw = dict(RGBNT_PRESETS[args.preset])
        for key in ("num_train_ids", "num_test_ids", "num_cams", "images_per_id_cam"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        if args.size is not None:
            kw["size"] = args.size
        wrote = generate_rgbnt(args.out, seed=args.seed, missing_modality_prob=args.missing_modality_prob,
                               workers=args.workers, force=args.force, **kw)
        n = 3 * (kw["num_train_ids"] + kw["num_test_ids"]) * kw["num_cams"] * kw["images_per_id_cam"]
    else:
        kw = dict(FEWSHOT_PRESETS[args.preset])
        if args.num_classes is not None:
            kw["num_classes"] = tuple(args.num_classes)
        if args.images_per_class is not None:
            kw["images_per_class"] = args.images_per_class
        if args.size is not None:
            kw["size"] = args.size[0]
        wrote = generate_fewshot(args.out, seed=args.seed, workers=args.workers, force=args.force, **kw)
        n = sum(kw["num_classes"]) * kw["images_per_class"]
    took = time.perf_counter() - start
    if wrote:
        print(f"wrote {n} images to {args.out} in {took:.1f} s")
    else:
        print(f"{args.out} is already complete with these arguments (use --force to regenerate)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
