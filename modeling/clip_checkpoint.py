"""Reading CLIP weight files, and the activation the weights were trained with.

Both CLIP towers of the repository read their weights here: the ReID image tower
(``MODEL.PRETRAIN_PATH``) and SAP's text tower (``MODEL.CLIP_WEIGHTS``). A CLIP network must
be built with the activation its weights were trained with: OpenAI's releases used QuickGELU
(``x * sigmoid(1.702 x)``), most open_clip / LAION checkpoints use ``nn.GELU``. The wrong one
changes every feature without any error, so the choice is made once, from the file where it
can tell, and logged.

Accepted files, and the activation ``MODEL.CLIP_ACTIVATION auto`` reads from each:

* a TorchScript archive (OpenAI's ``ViT-B-16.pt``): OpenAI format, QuickGELU;
* a state dict holding OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size``
  entries (the OpenAI archive's tensors saved with ``torch.save``): OpenAI format, QuickGELU;
* a state dict (``.pt``, ``.pth``, ``.bin``, plain or ``{"state_dict": ...}``) or ``.safetensors``
  file with an ``open_clip_config.json`` beside it (open_clip's local folder layout): that
  config's ``model_cfg.quick_gelu`` (absent: GELU);
* any other state dict: the file cannot tell, and ``auto`` stops with an error that asks for
  the key.

``MODEL.CLIP_ACTIVATION quick_gelu`` or ``gelu`` overrides the file (a disagreement with what
the file says is logged as a warning). Without a file (random init) ``auto`` means QuickGELU,
the activation of CLIP ViT-B/16 as OpenAI trained it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.io import load_error_summary

logger = logging.getLogger(__name__)

CLIP_ACTIVATIONS = ("auto", "quick_gelu", "gelu")
#: Scalar entries OpenAI's checkpoints carry besides the weights (dropped when loading).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
OPEN_CLIP_CONFIG = "open_clip_config.json"
_FORMAT_NAMES = {
    "openai-torchscript": "OpenAI format (TorchScript archive)",
    "openai-state-dict": "OpenAI format (state dict)",
    "open_clip": f"open_clip format ({OPEN_CLIP_CONFIG})",
    "state-dict": "state dict",
}


class ClipWeightsError(UserError, ValueError):
    """A CLIP weights file that cannot be used: unreadable, not CLIP, or a training checkpoint."""


@dataclass(frozen=True)
class ClipFile:
    """What a CLIP weights file is, as far as the file tells.

    Attributes:
        path: the file.
        format: ``openai-torchscript`` | ``openai-state-dict`` | ``open_clip`` | ``state-dict``.
        quick_gelu: the activation the file implies (``None``: the file does not say).
    """

    path: str
    format: str
    quick_gelu: bool | None


def activation_name(quick_gelu: bool) -> str:
    """``"QuickGELU"`` or ``"GELU"``: the name used in logs and cache keys."""
    return "QuickGELU" if quick_gelu else "GELU"


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (the OpenAI ``ViT-B-16.pt``): it holds ``code/`` and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _open_clip_sidecar(path: Path) -> bool | None:
    """``model_cfg.quick_gelu`` of an ``open_clip_config.json`` beside ``path`` (``None``: no such file)."""
    sidecar = path.parent / OPEN_CLIP_CONFIG
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{sidecar}: not a readable open_clip config ({err})") from err
    return bool(data.get("model_cfg", data).get("quick_gelu", False))


def _state_keys(path: Path) -> set[str]:
    """Keys of a state-dict file (inside a ``state_dict``/``model``/``module`` wrapper too), reading no
    tensor data (mmap / the safetensors header)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    state = _torch_load(path, mmap=True)
    return set(_unwrap(state)) if isinstance(_unwrap(state), Mapping) else set()


def _unwrap(state: object) -> object:
    """The state dict inside an open_clip / training checkpoint (``{"state_dict": {...}, "epoch": ...}``)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return state


def _looks_like_clip(keys: set[str]) -> bool:
    """True when some key is a CLIP image- or text-tower tensor (prefixes such as ``module.`` allowed)."""
    markers = ("conv1.weight", "class_embedding", "token_embedding.weight", "transformer.resblocks.")
    return any(marker in key for key in keys for marker in markers)


def _torch_load(path: Path, mmap: bool = False) -> object:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # the pre-zip legacy format cannot be memory-mapped
            return _torch_load(path, mmap=False)
        raise


def inspect_clip_file(path: str | os.PathLike) -> ClipFile:
    """Tell the format of a CLIP weights file and the activation it implies, reading no weights."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {p}")
    if is_torchscript_archive(p):
        return ClipFile(str(p), "openai-torchscript", True)
    try:
        keys = _state_keys(p)
    except Exception as err:  # re-raised with the path and what was expected
        raise ClipWeightsError(f"'{p}' is not a readable weights file: {load_error_summary(err)}") from None
    if {"format_version", "optimizer"} & keys or any(k.startswith("backbone.visual.") for k in keys):
        raise ClipWeightsError(
            f"'{p}' is a checkpoint of a model trained here, not CLIP weights: --resume {p} continues its run, "
            f"MODEL.WEIGHTS {p} starts a new run from all its weights, --eval-only MODEL.WEIGHTS {p} evaluates it"
        )
    if not _looks_like_clip(keys):
        raise ClipWeightsError(f"'{p}' holds no CLIP tensors (expected keys like 'visual.conv1.weight' or "
                               f"'token_embedding.weight'); first keys: {sorted(keys)[:5]}")
    if keys & set(OPENAI_EXTRA_KEYS):
        return ClipFile(str(p), "openai-state-dict", True)
    sidecar = _open_clip_sidecar(p)
    if sidecar is not None:
        return ClipFile(str(p), "open_clip", sidecar)
    return ClipFile(str(p), "state-dict", None)


def resolve_quick_gelu(activation: str, info: ClipFile | None = None) -> bool:
    """QuickGELU (True) or GELU (False) for ``MODEL.CLIP_ACTIVATION`` and the file ``info`` (``None``: no file).

    Raises ``ValueError`` for an unknown ``activation`` and, with ``auto``, for a file that does
    not say which activation it was trained with. ``quick_gelu`` / ``gelu`` win over the file
    (:func:`log_choice` warns about a disagreement).
    """
    if activation not in CLIP_ACTIVATIONS:
        raise ValueError(f"MODEL.CLIP_ACTIVATION must be one of {CLIP_ACTIVATIONS}, got {activation!r}")
    if activation == "auto":
        if info is None:
            return True
        if info.quick_gelu is None:
            raise ValueError(
                f"cannot tell which activation the CLIP weights {info.path} were trained with (not OpenAI's "
                f"format, no {OPEN_CLIP_CONFIG} beside it): set MODEL.CLIP_ACTIVATION quick_gelu (OpenAI weights) "
                f"or gelu (most open_clip / LAION weights)"
            )
        return info.quick_gelu
    return activation == "quick_gelu"


def describe(arch: str, info: ClipFile | None, quick_gelu: bool, activation: str) -> str:
    """One line: ``CLIP ViT-B-16 from <file>: OpenAI format (TorchScript archive), QuickGELU``."""
    source = "" if activation == "auto" else f" (MODEL.CLIP_ACTIVATION {activation})"
    if info is None:
        return f"CLIP {arch}: random initialisation, {activation_name(quick_gelu)}{source}"
    return f"CLIP {arch} from {info.path}: {_FORMAT_NAMES[info.format]}, {activation_name(quick_gelu)}{source}"


def log_choice(log: logging.Logger, tower: str, arch: str, info: ClipFile | None, quick_gelu: bool,
               activation: str) -> None:
    """Log which weights a tower was built from and with which activation (a warning when the
    config overrides what the file implies)."""
    overridden = info is not None and info.quick_gelu is not None and info.quick_gelu != quick_gelu
    line = describe(arch, info, quick_gelu, activation)
    if overridden:
        line += f"; the file implies {activation_name(not quick_gelu)}"
    log.log(logging.WARNING if overridden else logging.INFO, "%s: %s", tower, line)


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` dict of a CLIP checkpoint on disk.

    Accepts a TorchScript archive (OpenAI), a ``.safetensors`` file, a plain state dict, or a
    dict with ``state_dict`` / ``model`` / ``module`` inside (open_clip and other training
    checkpoints). Strips ``module.`` / ``_orig_mod.`` prefixes and OpenAI's scalar entries.
    Pickled Python objects are refused (``weights_only=True``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {p}")
    if is_torchscript_archive(p):
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI released
            warnings.simplefilter("ignore", FutureWarning)
            state: object = torch.jit.load(str(p), map_location="cpu").state_dict()
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = _torch_load(p)
        except Exception as err:  # re-raised with the path and what was expected
            raise ClipWeightsError(f"'{p}' is not a readable weights file: {load_error_summary(err)}") from None
    state = _unwrap(state)
    if not isinstance(state, Mapping):
        raise ClipWeightsError(f"'{p}' holds a {type(state).__name__}, not a state dict")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key in OPENAI_EXTRA_KEYS:
            continue
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned
