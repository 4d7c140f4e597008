"""tools/benchmark.py measures the configured step: with DETERMINISTIC True, under deterministic kernels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402

from engine.config import load_config  # noqa: E402


def test_deterministic_key_reaches_the_measured_step() -> None:
    args = argparse.Namespace(num_classes=4, num_cameras=2)
    cpu = torch.device("cpu")
    try:
        for deterministic in (True, False):
            cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml",
                              ["DETERMINISTIC", str(deterministic), "SOLVER.IMS_PER_BATCH", "8",
                               "DATALOADER.NUM_INSTANCE", "4"])
            *_, step = benchmark._setup(cfg, "fp32", cpu, args, compiled=False)
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            step()  # one real step under that setting
    finally:
        torch.use_deterministic_algorithms(False)


def test_parts_measure_only_what_was_asked() -> None:
    """``--parts eval`` times the evaluation alone (the train figures are NaN), ``--parts train`` the step alone."""
    import math

    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml",
                      ["SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "4", "TEST.IMS_PER_BATCH", "8"])
    cpu = torch.device("cpu")
    base = dict(num_classes=4, num_cameras=2, compile=False, steps=1, warmup=1)
    only_eval = benchmark.bench_precision(cfg, "fp32", cpu, argparse.Namespace(**base, parts="eval"))
    assert math.isnan(only_eval["train_samples_per_s"]) and only_eval["eval_samples_per_s"] > 0
    only_train = benchmark.bench_precision(cfg, "fp32", cpu, argparse.Namespace(**base, parts="train"))
    assert only_train["train_samples_per_s"] > 0 and math.isnan(only_train["eval_samples_per_s"])
