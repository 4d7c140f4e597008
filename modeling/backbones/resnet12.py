"""The standard few-shot ResNet-12 (TADAM / MetaOptNet / FEAT / DeepEMD): 64-160-320-640 channels, DropBlock.

Four residual stages; each stage is three 3x3 conv-BN layers (LeakyReLU 0.1 between them),
a 1x1 conv-BN shortcut, LeakyReLU after the sum, a 2x2 max-pool, then dropout (stages 1-2)
or DropBlock (stages 3-4). An 84x84 image gives a (640, 5, 5) map; the output is its
global average, a 640-d feature. With the default widths the network has 12,424,320
parameters (convolutions 12,409,344 + BatchNorm 14,976), the count of the published
few-shot codebases (e.g. Sha-Lab/FEAT ``model/networks/res12.py``).

DropBlock (Ghiasi et al. 2018) drops contiguous ``block_size x block_size`` squares of a
feature map. As in the published recipes its drop probability ramps linearly from 0 to
``drop_rate`` over ``dropblock_ramp_steps`` training forward calls; the counter is a buffer,
so a resumed run continues the ramp where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modeling.registry import BACKBONE_REGISTRY

LEAKY_SLOPE = 0.1


class DropBlock(nn.Module):
    """Drop ``block_size``-square regions of a (B, C, H, W) map with a linearly ramped rate.

    The seed probability ``gamma`` is chosen so that, in expectation, a fraction
    ``drop_rate * ramp`` of the activations is dropped (Ghiasi et al., eq. 1):
    ``gamma = p / bs^2 * H W / ((H - bs + 1)(W - bs + 1))``. Kept activations are rescaled
    by ``numel / kept`` so the expected sum is unchanged. Identity in eval mode.
    """

    def __init__(self, drop_rate: float, block_size: int, ramp_steps: int = 0) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.drop_rate = float(drop_rate)
        self.block_size = int(block_size)
        self.ramp_steps = int(ramp_steps)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def rate(self) -> torch.Tensor | float:
        """Drop probability at the current point of the ramp: a float64 tensor on the counter's device (read
        without a host sync, so a compiled forward is not recompiled as the ramp moves), or the fixed rate."""
        if self.ramp_steps <= 0:
            return self.drop_rate
        return self.drop_rate * (self.num_batches_tracked.double() / self.ramp_steps).clamp(max=1.0)

    def current_rate(self) -> float:
        """Drop probability at the current point of the ramp, on the host."""
        return float(self.rate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not self.training or self.drop_rate == 0.0:
            return x
        self.num_batches_tracked += 1
        _, _, h, w = x.shape
        bs = min(self.block_size, h, w)
        valid_h, valid_w = h - bs + 1, w - bs + 1
        gamma = self.rate() / bs**2 * (h * w) / (valid_h * valid_w)
        probs = torch.empty((x.shape[0], x.shape[1], valid_h, valid_w), device=x.device, dtype=x.dtype)
        seeds = torch.bernoulli(probs.fill_(gamma))
        # grow every seed into a bs x bs block (the block's top-left corner is the seed)
        seeds = F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1))
        dropped = F.max_pool2d(seeds, kernel_size=bs, stride=1)[..., :h, :w]
        keep = 1.0 - dropped
        kept = keep.sum().clamp_min(1.0)
        return x * keep * (keep.numel() / kept)


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class ResBlock12(nn.Module):
    """One ResNet-12 stage: (conv3x3-BN-LReLU) x2, conv3x3-BN, + 1x1 shortcut, LReLU, max-pool, drop."""

    def __init__(self, cin: int, cout: int, drop_rate: float = 0.0, drop_block: bool = False,
                 block_size: int = 5, ramp_steps: int = 0) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3)
        self.conv2 = _conv_bn(cout, cout, 3)
        self.conv3 = _conv_bn(cout, cout, 3)
        self.shortcut = _conv_bn(cin, cout, 1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.MaxPool2d(2)
        if drop_block:
            self.drop: nn.Module = DropBlock(drop_rate, block_size, ramp_steps)
        else:
            self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, cout, H // 2, W // 2)."""
        out = self.act(self.conv1(x))
        out = self.act(self.conv2(out))
        out = self.conv3(out)
        out = self.act(out + self.shortcut(x))
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12 feature extractor: (B, 3, H, W) -> (B, channels[-1]); ``out_dim`` = channels[-1].

    Args:
        channels: widths of the four stages (default 64, 160, 320, 640).
        drop_rate: dropout probability of stages 1-2 and DropBlock rate of stages 3-4.
        dropblock_size: DropBlock square side (5 in the published recipes).
        dropblock_ramp_steps: training forward calls over which DropBlock ramps up (0: no ramp).
        in_chans: input channels.
    """

    def __init__(self, channels: Sequence[int] = (64, 160, 320, 640), drop_rate: float = 0.1,
                 dropblock_size: int = 5, dropblock_ramp_steps: int = 40000, in_chans: int = 3) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4:
            raise ValueError(f"ResNet-12 has four stages; got channels={channels}")
        stages = []
        cin = in_chans
        for i, cout in enumerate(channels):
            stages.append(ResBlock12(cin, cout, drop_rate, drop_block=i >= 2, block_size=dropblock_size,
                                     ramp_steps=dropblock_ramp_steps))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_dim = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=LEAKY_SLOPE)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/16, W/16) feature map."""
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim), global average of the last map."""
        return self.forward_features(x).mean(dim=(2, 3))


@BACKBONE_REGISTRY.register("resnet12")
def resnet12(channels: Sequence[int] = (64, 160, 320, 640), drop_rate: float = 0.1, dropblock_size: int = 5,
             dropblock_ramp_steps: int = 40000, **_: object) -> ResNet12:
    """Registered builder of :class:`ResNet12` (unknown keyword arguments are ignored)."""
    return ResNet12(channels, drop_rate, dropblock_size, dropblock_ramp_steps)
