"""Device and mixed-precision policy: one place decides where and in which dtype a step runs."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch

from engine.config import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto | cpu | cuda | cuda:N`` to a device; under torchrun, ``cuda`` means this rank's GPU."""
    name = name.lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE.NAME is '{name}' but no CUDA device is visible; use DEVICE.NAME cpu (or auto)")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device(name)
    if name != "cpu":
        raise ConfigError(f"DEVICE.NAME must be auto, cpu, cuda or cuda:N, got '{name}'")
    return torch.device("cpu")


@dataclass
class AmpPolicy:
    """Autocast dtype for the forward pass and the gradient scaler that goes with it.

    ``dtype`` None means plain fp32. fp16 needs loss scaling (``scaler`` enabled);
    bf16 has fp32's exponent range and does not.
    """

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass and loss; a no-op in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def build_amp_policy(precision: str, device: torch.device) -> AmpPolicy:
    """Resolve ``DEVICE.PRECISION`` (auto | fp32 | bf16 | fp16) for ``device``.

    ``auto`` picks bf16 on a CUDA device that supports it, fp16 on older GPUs and
    fp32 on the CPU (CPU autocast is slower than fp32 for these models).
    """
    precision = precision.lower()
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"DEVICE.PRECISION must be auto, fp32, bf16 or fp16, got '{precision}'")
    policy = AmpPolicy(device=device, dtype=_DTYPES[precision])
    if device.type == "cpu" and policy.dtype is not None:
        logger.warning("DEVICE.PRECISION %s on the CPU is several times slower than fp32 (tiny DeMo: 6x); give "
                       "DEVICE.PRECISION fp32 for CPU runs", precision)
    logger.info("device %s, precision %s, grad scaler %s", device, policy.precision, policy.scaler.is_enabled())
    return policy
