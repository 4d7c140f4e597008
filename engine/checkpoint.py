"""Atomic checkpoints that resume a run exactly: model, optimizer, scheduler, scaler, counters, RNG.

Files live in the run folder as ``checkpoint_<tag>.pth`` plus a ``last_checkpoint``
text file naming the newest one. Every write goes to a temporary file that is
renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from engine.config import flatten
from engine.family import families, family_of_model
from engine.seed import get_rng_state, set_rng_state
from utils.distributed import is_main_process
from utils.errors import UserError
from utils.io import atomic_write, atomic_write_text, load_error_summary

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST_POINTER = "last_checkpoint"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not match the run; the message says which file and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / torch.compile wrappers (so checkpoints load anywhere)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_state(
    model: Mapping[str, torch.Tensor],
    *,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    epoch: int = 0,
    step: int = 0,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one layout of a checkpoint file (what :meth:`Checkpointer.load` reads)."""
    return {"format_version": FORMAT_VERSION, "model": dict(model), "optimizer": optimizer, "scheduler": scheduler,
            "scaler": scaler, "epoch": int(epoch), "step": int(step), "rng": rng, "extra": extra or {}}


def write_weights(path: str | Path, model: Mapping[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
    """Write a weights-only checkpoint (epoch 0, no optimizer state) atomically: for ``MODEL.WEIGHTS``."""
    atomic_write(path, lambda handle: torch.save(checkpoint_state(model, extra=extra), handle))


def _to_host(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to host memory (a copy even of CPU tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


class Checkpointer:
    """Saves and restores the full training state of one run folder.

    Only rank 0 writes; every rank can load. ``keep`` bounds how many periodic
    checkpoints stay on disk (the newest ``keep``; named ones such as ``best``
    are never deleted).
    """

    def __init__(self, save_dir: str | Path, keep: int = 2, background: bool = False) -> None:
        self.save_dir = Path(save_dir)
        self.keep = keep
        # background: save() copies the state to host memory and returns; one writer thread writes the
        # files in order (the step does not wait for the disk). wait() joins it and raises its error.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self._pending: list[Future[None]] = []

    def path_for(self, tag: str) -> Path:
        """Where the checkpoint called ``tag`` lives."""
        return self.save_dir / f"checkpoint_{tag}.pth"

    def save(
        self,
        tag: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        epoch: int = 0,
        step: int = 0,
        extra: dict[str, Any] | None = None,
        periodic: bool = True,
        resumable: bool = True,
    ) -> Path | None:
        """Write ``checkpoint_<tag>.pth`` atomically and point ``last_checkpoint`` at it.

        ``epoch``/``step`` are the numbers of *completed* epochs/steps, i.e. where a
        resumed run starts. ``extra`` holds other stateful objects' ``state_dict()``s
        (tensors, numbers, strings, lists, dicts). ``periodic`` checkpoints are pruned to the
        newest ``keep``; only ``resumable`` ones (full training state) move the
        ``last_checkpoint`` pointer that ``--resume`` follows. Returns the path (None off rank 0).
        """
        if not is_main_process():
            return None
        state = checkpoint_state(
            unwrap(model).state_dict(),
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            epoch=epoch, step=step, rng=get_rng_state(), extra=extra,
        )
        path = self.path_for(tag)
        if self._writer is None:
            self._write(state, path, resumable, periodic)
        else:
            self._raise_failed()
            snapshot = _to_host(state)  # the next step changes the live tensors; the file holds this moment
            self._pending.append(self._writer.submit(self._write, snapshot, path, resumable, periodic))
        return path

    def _write(self, state: dict[str, Any], path: Path, resumable: bool, periodic: bool) -> None:
        atomic_write(path, lambda handle: torch.save(state, handle))
        if resumable:
            atomic_write_text(self.save_dir / LAST_POINTER, path.name + "\n")
        if periodic:
            self._prune(keep_also=path)
        logger.info("saved checkpoint %s (epoch %d, step %d)", path, state["epoch"], state["step"])

    def _raise_failed(self) -> None:
        """Re-raise the error of a background write that has failed (the files before it are intact)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def wait(self) -> None:
        """Block until every background write is on disk; raise the first one's error, if any."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def latest(self) -> Path | None:
        """The checkpoint ``last_checkpoint`` names, if it exists (after the pending writes)."""
        self.wait()
        pointer = self.save_dir / LAST_POINTER
        if not pointer.is_file():
            return None
        try:
            path = self.save_dir / pointer.read_text(errors="replace").strip()
            return path if path.name.startswith("checkpoint_") and path.is_file() else None
        except (OSError, ValueError):  # unreadable, or not a file name (garbage, a NUL byte)
            return None

    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        restore_rng: bool = True,
        strict: bool = True,
    ) -> dict[str, Any]:
        """Restore state from ``path`` into the given objects; return ``{epoch, step, extra}``.

        Raises ``CheckpointError`` naming the file (and the other checkpoints
        available) when it is missing, truncated, corrupt or does not fit the model.
        """
        state = read_checkpoint(path, self.save_dir)
        self.restore_model(state, path, model, strict=strict)
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None and state.get(name) is not None:
                obj.load_state_dict(state[name])
        if restore_rng and state.get("rng") is not None:
            set_rng_state(state["rng"])
        logger.info("loaded %s (epoch %d, step %d)", path, state["epoch"], state["step"])
        return {"epoch": state["epoch"], "step": state["step"], "extra": state.get("extra", {})}

    @staticmethod
    def restore_model(state: dict[str, Any], path: str | Path, model: nn.Module, strict: bool = True) -> None:
        """Load the weights of a checkpoint already read (from ``path``, named in the error) into ``model``."""
        try:
            unwrap(model).load_state_dict(state["model"], strict=strict)
        except RuntimeError:
            raise CheckpointError(mismatch_message(state, path, unwrap(model))) from None

    def _prune(self, keep_also: Path) -> None:
        periodic = sorted(self.save_dir.glob("checkpoint_epoch*.pth"))  # tags are zero-padded: epoch0007
        for old in periodic[: max(0, len(periodic) - self.keep)]:
            if old != keep_also:
                old.unlink(missing_ok=True)


def resolve_resume(ckpt: Checkpointer, resume: str | None) -> Path | None:
    """``--resume``: ``None`` -> a fresh run; ``"auto"`` -> the run's newest checkpoint (error if none); else the path."""
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt.latest()
        if latest is None:
            pointer = ckpt.save_dir / LAST_POINTER
            found = _list_checkpoints(ckpt.save_dir, exclude=pointer)
            there = (f"; checkpoints there: {', '.join(found)}: pass one with --resume PATH" if found
                     else "; no checkpoint file there either")
            if pointer.is_file():
                named = pointer.read_text(errors="replace").strip()[:80]
                raise FileNotFoundError(f"--resume: {pointer} names '{named}', which is not a checkpoint file in "
                                        f"{ckpt.save_dir}{there}")
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.save_dir} (no '{LAST_POINTER}' file{there})")
        return latest
    return Path(resume)


def eval_weights(ckpt: Checkpointer, resume_path: Path | None, weights: str) -> Path:
    """The checkpoint ``--eval-only`` evaluates: ``--resume PATH``, else ``MODEL.WEIGHTS``, else the run's newest."""
    path = resume_path or (Path(weights) if weights else ckpt.latest())
    if path is None:
        raise FileNotFoundError("--eval-only needs --resume PATH, MODEL.WEIGHTS, or a checkpoint in OUTPUT_DIR")
    return path


def read_checkpoint(path: str | Path, search_dir: str | Path | None = None) -> dict[str, Any]:
    """Load a checkpoint file to CPU with clear errors for missing or damaged files."""
    path = Path(path)
    others = _list_checkpoints(Path(search_dir) if search_dir else path.parent, exclude=path)
    hint = f" Other checkpoints there: {', '.join(others)}." if others else ""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}.{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, wrong format: all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {load_error_summary(err)}).{hint} "
            "Pass one of them with --resume PATH; nothing was overwritten."
        ) from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this repository (no model/format_version)")
    return state


def _list_checkpoints(directory: Path, exclude: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(str(p) for p in directory.glob("checkpoint_*.pth") if p.resolve() != exclude.resolve())


def checkpoint_meta(cfg: Any) -> dict[str, Any]:
    """What a checkpoint records about where it came from: the model name, its family and the whole config."""
    family = family_of_model(cfg.MODEL.NAME)
    return {"model": cfg.MODEL.NAME, "family": family.name if family is not None else None, "config": cfg.dump()}


def mismatch_message(state: dict[str, Any], path: str | Path, model: nn.Module) -> str:
    """One paragraph on why checkpoint ``state`` does not load into ``model``: which model it is from (when
    it says), and the first keys that are missing, unexpected or of another shape."""
    meta = (state.get("extra") or {}).get("meta") or {}
    own = model.state_dict()
    theirs = state["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    origin = ""
    if meta.get("model"):
        family = next((f for f in families() if f.name == meta.get("family")), None)
        origin = f" It was written by a run of MODEL.NAME {meta['model']}"
        if family is not None:
            origin += f" ({family.label}: {family.script})"
        origin += "."
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
    return (f"checkpoint {path} does not fit this {type(model).__name__} model: {'; '.join(parts) or 'keys differ'}."
            f"{origin} Evaluate it with the config it was trained with (its run folder's config.yaml).")


def config_differences(state: dict[str, Any], cfg: Any, prefixes: tuple[str, ...] = ("MODEL.", "INPUT.")) -> list[str]:
    """``KEY: trained -> now`` for the keys under ``prefixes`` whose value in ``cfg`` differs from the config
    the checkpoint was trained with (empty when the checkpoint does not record it)."""
    meta = (state.get("extra") or {}).get("meta") or {}
    if not meta.get("config"):
        return []
    trained = flatten(yaml.safe_load(meta["config"]))
    now = flatten(yaml.safe_load(cfg.dump()))
    ignore = {"MODEL.WEIGHTS", "MODEL.PRETRAIN_PATH", "MODEL.PRETRAIN_RECIPE", "MODEL.COMPILE"}
    return [f"{k}: {trained[k]!r} -> {now[k]!r}" for k in sorted(trained)
            if k.startswith(prefixes) and k not in ignore and k in now and now[k] != trained[k]]


def warn_config_differences(state: dict[str, Any], cfg: Any, path: str | Path) -> list[str]:
    """Log, as a warning, the model and input keys in which ``cfg`` differs from the config checkpoint
    ``state`` (as :meth:`Checkpointer.load` returns it) was trained with; returns them."""
    changed = config_differences(state, cfg)
    if changed:
        logger.warning("evaluating %s under a config that differs from its training config in %d model/input "
                       "key(s): %s", path, len(changed), "; ".join(changed))
    return changed
