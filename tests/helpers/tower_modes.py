"""Run a CLIP tower every way a test of its evaluation kernels needs to tell apart."""

from __future__ import annotations

import torch
from torch import nn


def forward_each_way(tower: nn.Module, off: nn.Module, images: torch.Tensor) -> None:
    """``tower`` in fp32 with a backward pass, then under bf16 autocast with gradients (``off`` beside it), then with
    no gradient: fp32, bf16 autocast (``off`` beside it) and bf16 weights. An evaluation kernel of ``tower`` runs in
    the last two, in bf16, and nowhere else; ``off`` never runs one. ``tower`` is left in bf16."""
    tower(images).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tower(images)
        off(images)
    with torch.no_grad():
        tower(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tower(images)
            off(images)
        tower.bfloat16()(images.bfloat16())
