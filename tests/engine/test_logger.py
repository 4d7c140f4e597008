"""Metrics logger: JSONL always, W&B disabled / offline (no network) / online-but-unreachable fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.logger import MetricsLogger, resolve_wandb_mode

REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_disabled_writes_jsonl_and_summary_only(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, wandb_mode="disabled") as log:
        flat = log.log({"loss": torch.tensor(0.25), "lr": 1e-4}, step=3, prefix="train")
        log.log({"mAP": 0.5}, step=4, prefix="test")
        log.summary({"mAP": 0.5, "cmc": torch.tensor([0.1, 0.2])})
    assert flat == {"train/loss": 0.25, "train/lr": 1e-4}
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4] and rows[0]["train/loss"] == 0.25 and rows[1]["test/mAP"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text()) == {"cmc": pytest.approx([0.1, 0.2]), "mAP": 0.5}
    assert not (tmp_path / "wandb").exists()


def test_resumed_run_appends(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log({"a": 1}, step=1)
    with MetricsLogger(tmp_path) as log:
        log.log({"a": 2}, step=2)
    assert [r["a"] for r in _lines(tmp_path / "metrics.jsonl")] == [1.0, 2.0]


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="WANDB.MODE"):
        resolve_wandb_mode("sometimes")


def test_auto_mode_without_login_is_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"


_PROBE = """
import sys; sys.path.insert(0, {repo!r})
from engine.logger import MetricsLogger
log = MetricsLogger({out!r}, wandb_mode={mode!r}, config={{"x": 1}}, init_timeout=3)
log.log({{"loss": 1.5}}, step=1, prefix="train")
log.close()
print("MODE", log.wandb_mode)
"""


def _probe(out: Path, mode: str, env: dict[str, str]) -> str:
    code = _PROBE.format(repo=str(REPO), out=str(out), mode=mode)
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_offline_writes_its_run_folder_without_network(tmp_path: Path) -> None:
    # An unroutable server URL: offline mode must not touch it.
    out = tmp_path / "run"
    assert _probe(out, "offline", {"WANDB_BASE_URL": "http://127.0.0.1:9"}) == "MODE offline"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert _lines(out / "metrics.jsonl")[0]["train/loss"] == 1.5


def test_online_with_unreachable_server_falls_back_to_offline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "k" * 40}
    assert _probe(out, "online", env) == "MODE offline"
    assert list((out / "wandb").glob("offline-run-*"))


def test_warnings_reach_the_run_log(tmp_path: Path) -> None:
    import logging
    import warnings

    from engine.logger import setup_logging

    setup_logging(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("index_add_cuda_ does not have a deterministic implementation", UserWarning, stacklevel=1)
        for handler in logging.getLogger().handlers:
            handler.flush()
        assert "does not have a deterministic implementation" in (tmp_path / "log.txt").read_text()
    finally:
        setup_logging(None)
