"""A tiny convolutional backbone for tests and quick CPU runs (Conv-4 style, a few thousand parameters).

Each stage is conv3x3-BN-ReLU followed by a 2x2 max-pool; the output is the global average
of the last map. With ``channels=(8, 16)`` it runs an episode in milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modeling.registry import BACKBONE_REGISTRY


class TinyConv(nn.Module):
    """(B, 3, H, W) -> (B, channels[-1]); ``out_dim`` = channels[-1]."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), in_chans: int = 3) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("TinyConv needs at least one stage")
        layers: list[nn.Module] = []
        cin = in_chans
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim)."""
        return self.body(x).mean(dim=(2, 3))


@BACKBONE_REGISTRY.register("tiny_conv")
def tiny_conv(channels: Sequence[int] = (16, 32, 64), **_: object) -> TinyConv:
    """Registered builder of :class:`TinyConv` (unknown keyword arguments are ignored)."""
    return TinyConv(channels)
