"""tools/saved_memory.py: bytes saved for the backward, by part, and HDM keeping nothing per sample beyond its tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import saved_memory  # noqa: E402
from count_ops import PartStack  # noqa: E402

from engine.config import load_config  # noqa: E402


class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp()  # saves its result: 5 x 7 float32 = 140 bytes


def test_saved_storages_are_counted_once_by_the_part_that_saved_them() -> None:
    parts = PartStack(default="rest")
    exp = _Exp()
    parts.label("exp", exp)
    x = torch.randn(5, 7, requires_grad=True)
    with saved_memory.SavedBytes(parts) as saved:
        y = exp(x)
        with parts.part("tail"):
            y.sin()  # saves y again: already counted for "exp"
            (y + 1).cos()  # saves y + 1: a new 140-byte storage
    assert dict(saved.bytes) == {"exp": 140, "tail": 140}


def test_demo_sdtps_parts_and_hdm_saves_per_sample_no_more_than_its_tokens(monkeypatch) -> None:
    """Per sample, HDM keeps for its backward at most three times the bf16 tokens it attends over (a weight
    copied once per sample, as a broadcast matmul does, is 7 x 64 x 64 x 2 bytes here: 8 times the tokens)."""
    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml", ["DEVICE.NAME", "cpu"])
    shapes: list[tuple[int, ...]] = []
    build = saved_memory.build_reid_model

    def build_and_watch_hdm(*args, **kwargs) -> nn.Module:
        model = build(*args, **kwargs)
        model.hdm.register_forward_pre_hook(lambda _module, inputs: shapes.append(tuple(inputs[0].shape)))
        return model

    monkeypatch.setattr(saved_memory, "build_reid_model", build_and_watch_hdm)
    k = cfg.DATALOADER.NUM_INSTANCE
    small, large = saved_memory.saved_by_part(cfg, k), saved_memory.saved_by_part(cfg, 2 * k)
    assert {"backbone", "sdtps", "hdm", "loss"} <= set(small)
    assert all(large[p] > small[p] for p in ("backbone", "sdtps", "loss"))
    modalities, batch, length, dim = shapes[0]
    assert batch == k and shapes[1][1] == 2 * k
    assert (large["hdm"] - small["hdm"]) / k <= 3 * modalities * length * dim * 2
    assert "| total |" in saved_memory.table((k, small), (2 * k, large), cfg.SOLVER.IMS_PER_BATCH)
