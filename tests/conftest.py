"""Shared test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_rgbnt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small synthetic RGBNT set (8 train ids, 4 test ids, 2 cameras) under ``root/synthetic_rgbnt``."""
    root = tmp_path_factory.mktemp("rgbnt_data")
    cmd = [sys.executable, "-m", "datasets.synthetic", "--kind", "rgbnt", "--out", str(root / "synthetic_rgbnt"),
           "--num-train-ids", "8", "--num-test-ids", "4", "--num-cams", "2", "--images-per-id-cam", "2"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return root
