"""Device resolution and the AMP policy on the CPU."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.device import build_amp_policy, resolve_device


def test_auto_device_and_precision_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    device = resolve_device("auto")
    assert device.type == "cpu"
    policy = build_amp_policy("auto", device)
    assert policy.precision == "fp32" and not policy.scaler.is_enabled()
    x = torch.randn(4, 4)
    with policy.autocast():
        assert (x @ x).dtype == torch.float32


def test_cuda_request_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):  # a user error: one line, exit 2
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="DEVICE.NAME"):
        resolve_device("tpu")


def test_bf16_autocast_on_cpu_and_no_scaler() -> None:
    policy = build_amp_policy("bf16", torch.device("cpu"))
    x = torch.randn(4, 4)
    with policy.autocast():
        assert (x @ x).dtype == torch.bfloat16
    assert not policy.scaler.is_enabled()


def test_fp16_uses_a_grad_scaler_that_steps() -> None:
    policy = build_amp_policy("fp16", torch.device("cpu"))
    assert policy.scaler.is_enabled()
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    x = torch.randn(8, 4)
    for _ in range(30):  # the first steps may overflow at scale 65536 and be skipped: that is the point
        opt.zero_grad()
        with policy.autocast():
            loss = model(x).float().pow(2).mean()
        policy.scaler.scale(loss).backward()
        policy.scaler.unscale_(opt)
        policy.scaler.step(opt)
        policy.scaler.update()
    assert not torch.equal(before, model.weight)
    assert torch.isfinite(model.weight).all()


def test_bad_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="DEVICE.PRECISION"):
        build_amp_policy("fp8", torch.device("cpu"))
