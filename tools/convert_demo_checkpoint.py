#!/usr/bin/env python
"""Convert a checkpoint of the published DeMo code (924973292/DeMo) into one that ``MODEL.NAME DeMo`` loads.

    python tools/convert_demo_checkpoint.py DEMO.pth OUT.pth [--config_file FILE] [--force] [KEY VALUE ...]

``DEMO.pth`` is what DeMo's trainer saves (``torch.save(model.state_dict())``, ``module.``
prefixes allowed). ``OUT.pth`` is a checkpoint of this repository (the layout
:class:`engine.checkpoint.Checkpointer` writes, with the model weights only), for
``python train_net.py --config_file FILE --eval-only MODEL.WEIGHTS OUT.pth``.

What the checkpoint's shapes decide is inferred and printed: the number of classes, cameras
(SIE) and ATM chunks (``MODEL.DEMO.HEAD``), and which of GLOBAL_LOCAL / HDM / ATM / DIRECT
were on. The rest comes from the config (default: this repository's ``MODEL.NAME DeMo`` with
the CLIP ViT-B/16 tower at 256x128) and is checked against the checkpoint: the tower
(``MODEL.BACKBONE``) and the patch count (``INPUT.SIZE_TRAIN``; DeMo's RGBNT100 / MSVR310
configs use ``[128, 256]``, which has as many patches as ``[256, 128]``, so give it).
``MODEL.SIE_COE`` is not in the weights (DeMo's published configs use 1.0, this repository's default).

The key mapping is :mod:`modeling.demo_checkpoint`. Every DeMo tensor is used exactly once and
every tensor of the model is filled, except the learned stand-ins for a masked-out modality
(:data:`modeling.demo_checkpoint.NEW_KEYS`, which DeMo does not have): they keep this repository's
initialisation (seed ``SEED``) and matter only with ``TEST.MISS`` and ``TEST.MISS_MODE mask``;
DeMo's protocol is ``TEST.MISS_MODE zero``. Any other gap or leftover is an error that lists
the keys. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

from engine.checkpoint import write_weights
from engine.config import ConfigError, load_config
from engine.reid import build_reid_model
from modeling.demo_checkpoint import (
    DEMO_TOWER,
    ConversionError,
    DemoArchitecture,
    convert_state_dict,
    infer_architecture,
    short_key_list,
)

#: Settings DeMo's code fixes (not visible in the weights): ``(config key, value, reason)``.
DEMO_FIXED: list[tuple[str, Any, str]] = [
    ("MODEL.CLIP_ACTIVATION", "quick_gelu", "DeMo's CLIP tower uses QuickGELU whatever MODEL.PRETRAIN_PATH holds"),
]


# ----------------------------------------------------------------------------------------------
# Reading a DeMo checkpoint
# ----------------------------------------------------------------------------------------------
def read_demo_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a DeMo ``state_dict`` file (tensors only, ``weights_only=True``) with ``module.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"DeMo checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or pickled objects
        raise ConversionError(f"{path} is not a readable weights-only torch file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(state, Mapping) and "format_version" in state and "model" in state:
        raise ConversionError(f"{path} is already a checkpoint of this repository; load it directly")
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a DeMo state dict")
    tensors = {(k[len("module."):] if k.startswith("module.") else k): v
               for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("BACKBONE.") for k in tensors):
        raise ConversionError(f"{path} is not a DeMo checkpoint (no 'BACKBONE.*' tensors; first keys: "
                              f"{short_key_list(list(tensors)[:5])})")
    if DEMO_TOWER + "patch_embed.proj.weight" in tensors:
        raise ConversionError(f"{path} is a DeMo checkpoint with the ImageNet ViT backbone "
                              "(MODEL.TRANSFORMER_TYPE vit_base_patch16_224); only the CLIP ViT-B-16 one converts")
    if DEMO_TOWER + "conv1.weight" not in tensors or DEMO_TOWER + "proj" not in tensors:
        raise ConversionError(f"{path} has no CLIP image tower under '{DEMO_TOWER}' (conv1.weight, proj): "
                              "not a DeMo checkpoint of MODEL.TRANSFORMER_TYPE ViT-B-16")
    return tensors


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def _get(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: CN, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def resolve_config(arch: DemoArchitecture, config_file: str, opts: Sequence[str]) -> tuple[CN, list[str]]:
    """The config of the target model: file and overrides, then what the checkpoint decides.

    Returns the frozen config and one printable line per key set (noting a config value it replaced).
    Raises :class:`ConversionError` for settings DeMo's weights cannot serve.
    """
    cfg = load_config(config_file or None, opts, freeze=False)
    if not cfg.MODEL.NAME:
        cfg.MODEL.NAME = "DeMo"
    if cfg.MODEL.NAME != "DeMo" or cfg.MODEL.DGAF.ENABLED:
        raise ConversionError(f"wrong architecture: MODEL.NAME {cfg.MODEL.NAME} with MODEL.DGAF.ENABLED "
                              f"{cfg.MODEL.DGAF.ENABLED}; DeMo checkpoints have no SDTPS / DGAF weights, convert "
                              "with MODEL.NAME DeMo MODEL.DGAF.ENABLED False")
    if cfg.MODEL.CLIP_ACTIVATION == "gelu":
        raise ConversionError("wrong architecture: MODEL.CLIP_ACTIVATION gelu, but DeMo's CLIP tower uses QuickGELU")
    if cfg.MODEL.SIE_TOKENS != "cls":
        raise ConversionError(f"wrong architecture: MODEL.SIE_TOKENS {cfg.MODEL.SIE_TOKENS}, but DeMo adds the "
                              "camera embedding to the class token only (cls)")
    lines = []
    for key, value, why in [*arch.settings(), *DEMO_FIXED]:
        before = _get(cfg, key)
        _set(cfg, key, value)
        shown = before != value and key not in ("MODEL.NUM_CLASSES", "MODEL.NUM_CAMERAS")  # set from the dataset
        note = f"; the config had {before}" if shown else ""
        lines.append(f"  {key} {value}  ({why}{note})")
    cfg.freeze()
    return cfg, lines


def eval_overrides(cfg: CN, arch: DemoArchitecture, config_file: str, opts: Sequence[str]) -> list[str]:
    """``KEY VALUE`` pairs that make ``config_file`` build the converted model: the user's overrides and
    what the checkpoint changed (classes and cameras come from the dataset at evaluation, so they are left out)."""
    dataset_keys = {"MODEL.NUM_CLASSES", "MODEL.NUM_CAMERAS"}
    out: list[str] = []
    for key, value in zip(opts[0::2], opts[1::2]):
        if key not in dataset_keys:
            out += [key, value]
    given = load_config(config_file or None, opts, freeze=False)
    for key in ["MODEL.NAME", *(k for k, _, _ in [*arch.settings(), *DEMO_FIXED])]:
        if key not in dataset_keys and _get(cfg, key) != _get(given, key):
            out += [key, str(_get(cfg, key))]
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_target_model(cfg: CN) -> torch.nn.Module:
    """A fresh model of ``cfg`` (seed ``cfg.SEED``), with the CLIP tower left at random init (it is overwritten)."""
    model_cfg = cfg.clone()
    model_cfg.defrost()
    model_cfg.MODEL.PRETRAIN_PATH = ""
    model_cfg.freeze()
    torch.manual_seed(cfg.SEED)
    quiet = logging.getLogger("modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "starts from random initialisation": true, and irrelevant here
    try:
        return build_reid_model(model_cfg, cfg.MODEL.NUM_CLASSES, cfg.MODEL.NUM_CAMERAS)
    finally:
        quiet.setLevel(level)


def _dtype_summary(state: Mapping[str, torch.Tensor]) -> str:
    counts: dict[str, int] = {}
    for v in state.values():
        name = str(v.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def convert(src: str | Path, dst: str | Path, config_file: str = "", opts: Sequence[str] = (),
            force: bool = False) -> dict[str, Any]:
    """Convert ``src`` (DeMo) to ``dst`` (this repository), printing what was inferred; returns a summary.

    An existing ``dst`` is refused unless ``force`` (``--force``) replaces it."""
    if Path(src).resolve() == Path(dst).resolve():
        raise ConversionError(f"the output {dst} would overwrite the DeMo checkpoint")
    if Path(dst).exists() and not force:
        raise ConversionError(f"the output {dst} exists; nothing was written: choose another path, or pass --force "
                              "to replace it")
    demo = read_demo_state_dict(src)
    print(f"DeMo checkpoint {src}: {len(demo)} tensors ({_dtype_summary(demo)})")
    arch = infer_architecture(demo)
    cfg, lines = resolve_config(arch, config_file, opts)
    print("inferred from the checkpoint (and fixed by DeMo's code):")
    print("\n".join(lines))
    print("taken from the config" + (f" {config_file}" if config_file else " (defaults)") + ", checked against it:")
    print(f"  MODEL.BACKBONE {cfg.MODEL.BACKBONE or 'clip_vit_b16'}  (checkpoint tower: {arch.tower})")
    print(f"  INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)}  (the checkpoint has {arch.tower.num_patches} patches; "
          "their layout is not in the weights)")
    print(f"  MODEL.SIE_COE {cfg.MODEL.SIE_COE}  (not in the weights; DeMo's published configs: 1.0)")
    model = build_target_model(cfg)
    converted, kept = convert_state_dict(demo, model.state_dict(), arch)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:  # convert_state_dict covers every key; this guards the guard
        raise ConversionError(f"the converted weights do not load: {' '.join(str(err).split())}") from err
    if kept:
        print(f"not in DeMo, kept at this repository's initialisation (seed {cfg.SEED}): {', '.join(kept)} "
              "(used only for masked-out modalities: TEST.MISS with TEST.MISS_MODE mask; DeMo's protocol is "
              "TEST.MISS_MODE zero)")
    overrides = eval_overrides(cfg, arch, config_file, opts)
    extra = {"converted_from": str(src), "converter": "tools/convert_demo_checkpoint.py",
             "inferred": {key: value for key, value, _ in arch.settings()}, "eval_overrides": overrides}
    write_weights(dst, model.state_dict(), extra)
    print(f"wrote {dst}: {len(converted)} tensors from {len(demo)} DeMo tensors")
    print("evaluate with (a dataset with "
          f"{arch.num_classes} training identities" + (f" and {arch.num_cameras} cameras" if arch.num_cameras else "")
          + "):")
    command = ["python", "train_net.py", "--config_file", config_file or "<your dataset config>", "--eval-only",
               "MODEL.WEIGHTS", str(dst), *overrides]
    print("  " + shlex.join(command))
    return {"arch": arch, "config": cfg, "kept": kept, "eval_overrides": overrides}


def build_parser() -> argparse.ArgumentParser:
    """``DEMO OUT [--config_file FILE] [KEY VALUE ...]``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. INPUT.SIZE_TRAIN '[128, 256]' "
               "INPUT.SIZE_TEST '[128, 256]'",
    )
    parser.add_argument("demo_checkpoint", help="state dict saved by DeMo's trainer (.pth)")
    parser.add_argument("output", help="where to write this repository's checkpoint")
    parser.add_argument("--config_file", "--config-file", default="", metavar="FILE",
                        help="YAML config of the target model (default: MODEL.NAME DeMo, ViT-B-16, 256x128)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (refused otherwise)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (2 with a one-line error on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    opts = [t for t in args.opts if t != "--"]
    if "--force" in opts:  # given after the paths, REMAINDER has swallowed it
        opts.remove("--force")
        args.force = True
    for flag in ("--config_file", "--config-file"):  # given after the paths, REMAINDER has swallowed it
        for i, token in enumerate(opts):
            if token == flag and i + 1 < len(opts):
                args.config_file = opts[i + 1]
                del opts[i:i + 2]
                break
            if token.startswith(flag + "="):
                args.config_file = token.split("=", 1)[1]
                del opts[i]
                break
    try:
        convert(args.demo_checkpoint, args.output, args.config_file, opts, force=args.force)
    except (ConversionError, ConfigError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
