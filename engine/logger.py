"""Console + file logging, JSONL metrics, progress bars, and W&B forwarding (online / offline / disabled).

W&B is imported only when a run asks for it, and any failure to reach or start
it degrades (online -> offline -> disabled) with a warning instead of crashing
or hanging the run. Metrics always go to ``metrics.jsonl`` in the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from utils.distributed import is_main_process
from utils.io import atomic_write_json

logger = logging.getLogger(__name__)
T = TypeVar("T")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def setup_logging(output_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to the console (rank 0 at ``level``, other ranks warnings only) and to ``<output_dir>/log.txt``.

    Python warnings (among them torch's notes on kernels without a deterministic implementation under
    ``DETERMINISTIC True``) go to the same handlers, so the run folder keeps them.
    """
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(level if is_main_process() else logging.WARNING)
    for handler in list(root.handlers):
        if getattr(handler, "_repo_handler", False):
            root.removeHandler(handler)
    fmt = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._repo_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """A tqdm bar on rank 0 (silent elsewhere; ``TQDM_DISABLE=1`` silences it everywhere)."""
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            disable=not is_main_process() or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
            dynamic_ncols=True,
            mininterval=1.0,
            leave=False,
            **kwargs,
        )
    )


def wandb_logged_in() -> bool:
    """True when an API key is available without asking the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` becomes ``online`` with a login, else ``offline``; others pass through checked."""
    if mode not in WANDB_MODES:
        raise ValueError(f"WANDB.MODE must be one of {WANDB_MODES}, got '{mode}'")
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    return mode


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl`` and forwards them to W&B on rank 0.

    ``log({"loss": 0.3, "lr": 1e-4}, step=120, prefix="train")`` appends one JSON
    line ``{"step": 120, "time": ..., "train/loss": 0.3, "train/lr": 0.0001}``.
    Values may be floats, ints or 0-d tensors (converted here, once per log call).
    """

    def __init__(
        self,
        output_dir: str | Path,
        wandb_mode: str = "disabled",
        config: Mapping[str, Any] | None = None,
        project: str = "demo-sdtps-expb1",
        entity: str = "",
        name: str = "",
        group: str = "",
        tags: Iterable[str] = (),
        init_timeout: float = 60.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = is_main_process()
        self.wandb_mode = "disabled"
        self._wandb: Any = None
        self._run: Any = None
        self._jsonl = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            self._start_wandb(mode, dict(config or {}), project, entity, name, group, list(tags), init_timeout)

    @classmethod
    def from_config(cls, cfg: Any, output_dir: str | Path | None = None) -> MetricsLogger:
        """The run's logger: ``OUTPUT_DIR`` (or ``output_dir``, e.g. an evaluation's own folder) and the ``WANDB``
        section, with the config sent to W&B."""
        from engine.config import config_to_dict

        w = cfg.WANDB
        return cls(cfg.OUTPUT_DIR if output_dir is None else output_dir, w.MODE, config=config_to_dict(cfg), project=w.PROJECT, entity=w.ENTITY,
                   name=w.NAME, group=w.GROUP, tags=w.TAGS, init_timeout=w.INIT_TIMEOUT)

    def _start_wandb(
        self, mode: str, config: dict[str, Any], project: str, entity: str, name: str, group: str,
        tags: list[str], init_timeout: float,
    ) -> None:
        try:
            import wandb
        except Exception as err:  # not installed, or its dependencies are missing
            logger.warning("W&B requested (%s) but cannot be imported (%s); logging to JSONL only", mode, err)
            return
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self._run = wandb.init(
                    mode=attempt,
                    dir=str(self.output_dir),
                    project=project,
                    entity=entity or None,
                    name=name or self.output_dir.name,
                    group=group or None,
                    tags=tags or None,
                    config=config,
                    resume="allow",
                    id=self._run_id(),
                    settings=wandb.Settings(init_timeout=init_timeout, silent=True),
                )
            except Exception as err:
                first_line = (str(err).splitlines() or [""])[0]
                logger.warning("W&B %s start failed (%s: %s)", attempt, type(err).__name__, first_line)
                with contextlib.suppress(Exception):  # release the half-started run so offline can reuse its id
                    wandb.teardown()
                continue
            self._wandb = wandb
            self.wandb_mode = attempt
            logger.info("W&B logging %s, run folder %s", attempt, getattr(self._run, "dir", "?"))
            return
        logger.warning("W&B disabled for this run; metrics are still in %s", self.output_dir / "metrics.jsonl")

    def _run_id(self) -> str:
        """A stable id per run folder so a resumed run continues the same W&B run."""
        path = self.output_dir / "wandb_run_id"
        if path.is_file():
            return path.read_text().strip()
        import uuid

        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id + "\n")
        return run_id

    def log(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> dict[str, float]:
        """Record ``metrics`` at ``step``; returns the converted ``{prefix/key: float}`` dict."""
        if not self.enabled:
            return {}
        flat = {f"{prefix}/{k}" if prefix else k: _to_number(v) for k, v in metrics.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **flat}) + "\n")
        if self._run is not None:
            try:
                self._run.log(flat, step=step)
            except Exception as err:  # a broken W&B connection must never stop training
                logger.warning("W&B log failed (%s); continuing with JSONL only", err)
                self._run = None
        return flat

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """Forward an image already saved in the run folder to W&B (no-op without W&B)."""
        if self._run is not None and self._wandb is not None:
            try:
                self._run.log({key: self._wandb.Image(str(path))}, step=step)
            except Exception as err:
                logger.warning("W&B image log failed (%s)", err)

    def summary(self, values: Mapping[str, Any], filename: str = "summary.json") -> Path | None:
        """Write the final results atomically to the run folder (and to the W&B summary)."""
        if not self.enabled:
            return None
        path = self.output_dir / filename
        atomic_write_json(path, {k: _to_jsonable(v) for k, v in values.items()})
        if self._run is not None:
            try:
                self._run.summary.update({k: _to_jsonable(v) for k, v in values.items()})
            except Exception as err:
                logger.warning("W&B summary failed (%s)", err)
        return path

    def close(self) -> None:
        """Flush and close the JSONL file and finish the W&B run."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as err:
                logger.warning("W&B finish failed (%s)", err)
            self._run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_number(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
