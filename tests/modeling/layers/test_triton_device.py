"""Where the Triton kernels run, and where they may hold inline PTX."""

from __future__ import annotations

import pytest
import torch

from modeling.layers import triton_device


@pytest.mark.parametrize(
    ("device", "interpreted", "hip", "expected"),
    [
        ("cuda", False, None, True),  # an NVIDIA GPU, compiled
        ("cuda:1", False, None, True),
        ("cuda", True, None, False),  # Triton's interpreter runs CUDA tensors too, and it has no PTX
        ("cuda", False, "6.2", False),  # a ROCm build: "cuda" devices are AMD GPUs
        ("cpu", True, None, False),
        ("cpu", False, None, False),
    ],
)
def test_only_compiled_kernels_on_an_nvidia_gpu_take_inline_ptx(
    monkeypatch: pytest.MonkeyPatch, device: str, interpreted: bool, hip: str | None, expected: bool
) -> None:
    monkeypatch.setattr(triton_device, "TRITON_INTERPRETED", interpreted)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert triton_device.triton_compiles_to_ptx(device) is expected
