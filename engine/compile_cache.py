"""A portable torch.compile cache: what the first compiled run of a setup produced, reused by the next.

``torch.compile`` keeps its compiled kernels in a local cache (``/tmp/torchinductor_<user>``), which a
fresh machine does not have. After the first epoch of a compiled stage, the trainer saves the
cache's artifacts (``torch.compiler.save_cache_artifacts``) to one file in ``MODEL.COMPILE_CACHE_DIR``
named by what the compiled graphs depend on (torch version, device, model and input config, batch,
precision, compile mode); a later run with the same key loads it before compiling
(``torch.compiler.load_cache_artifacts``) and skips most of the compilation. Copy the folder to a new
machine (or keep it on shared storage) to start warm there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.config import config_to_dict
from utils.io import atomic_write

logger = logging.getLogger(__name__)


def cache_path(cfg: Any, device: torch.device, stage: str) -> Path | None:
    """The cache file of this compiled stage, or ``None`` when the stage is not compiled or caching is off."""
    if not cfg.MODEL.COMPILE or not cfg.MODEL.COMPILE_CACHE_DIR:
        return None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    config = config_to_dict(cfg)
    keyed = {"torch": torch.__version__, "device": device_name, "stage": stage, "model": config["MODEL"],
             "input": config.get("INPUT"), "batch": cfg.SOLVER.IMS_PER_BATCH, "precision": cfg.DEVICE.PRECISION}
    keyed["model"].pop("WEIGHTS", None)
    keyed["model"].pop("PRETRAIN_PATH", None)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.MODEL.COMPILE_CACHE_DIR) / f"{stage}-{digest}.bin"


def load(path: Path | None) -> bool:
    """Load the artifacts in ``path`` into torch.compile's caches; False when there is no such file."""
    if path is None or not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a cache from another build of torch: compile from scratch
        logger.warning("compile cache %s not used (%s): compiling from scratch", path, err)
        return False
    logger.info("loaded the compile cache %s", path)
    return True


def save(path: Path | None) -> bool:
    """Write what torch.compile has compiled so far to ``path`` (atomically); False when there is nothing."""
    if path is None:
        return False
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    data = artifacts[0]
    atomic_write(path, lambda handle: handle.write(data))
    logger.info("saved the compile cache %s (%.1f MB)", path, len(data) / 2**20)
    return True
