"""tools/count_ops.py counts what one step dispatches, per part, and the count follows the code."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import count_ops  # noqa: E402

from engine.config import load_config  # noqa: E402


def test_ops_of_a_known_function_are_counted_by_part_and_phase() -> None:
    counter = count_ops.OpCounter()
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 2)
    counter.label("linear", lin)
    with counter:
        y = lin(x).reshape(8)  # linear's ops, then one view outside it
        with counter.part("tail"):
            z = (y * 2).sum()
        z.backward()
    counts = counter.counts
    assert counts[("tail", "forward", False)] == 2  # mul, sum
    assert counts[("other", "forward", True)] >= 1  # the reshape is a view
    assert counts[("linear", "forward", False)] >= 1 and sum(v for (p, f, _), v in counts.items() if f == "backward")


def test_step_count_has_every_part_of_demo_sdtps_and_changes_with_the_model() -> None:
    small = ["SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "4", "DEVICE.NAME", "cpu"]
    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml", small)
    counts = count_ops.count_step(cfg)
    parts = {p for p, _, _ in counts}
    assert {"backbone", "sdtps", "hdm", "loss", "optimizer", "clip"} <= parts
    without_sdtps = count_ops.count_step(load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml",
                                                     [*small, "MODEL.SDTPS.ENABLED", "False"]))
    assert "sdtps" not in {p for p, _, _ in without_sdtps}
    assert "| total |" in count_ops.table(counts)
