"""Seeding and deterministic kernels: what ``DETERMINISTIC`` and its two keys switch, and the evaluation's
forward-only relaxation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.seed import forward_only_kernels, seed_everything

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def free_kernels_after() -> Iterator[None]:
    """Every test leaves torch as a run without DETERMINISTIC does."""
    yield
    seed_everything(0, deterministic=False)


def test_deterministic_math_attention_forbids_the_fused_attention_kernels() -> None:
    """``DETERMINISTIC_ATTENTION math``: SDPA keeps to its math kernel."""
    seed_everything(0, deterministic=True, attention="math")
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    # strict: an operation without a deterministic implementation raises instead of warning
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    seed_everything(0, deterministic=False)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_fused_attention_leaves_the_kernel_choice_to_strict_torch() -> None:
    """``DETERMINISTIC_ATTENTION fused``: flash and memory-efficient stay allowed (strict
    deterministic algorithms make torch run their deterministic backward variants and drop cuDNN's attention
    itself); anything else is refused."""
    seed_everything(0, deterministic=True)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.raises(ValueError, match="attention must be one of"):
        seed_everything(0, deterministic=True, attention="flash")
    with pytest.raises(ConfigError, match="DETERMINISTIC_ATTENTION"):
        load_config(REPO / "configs" / "synthetic" / "ExpB1_SAP_tiny.yml", ["DETERMINISTIC_ATTENTION", "flash"])


def test_deterministic_triton_attention_keeps_the_fused_kernels_for_the_rest() -> None:
    """``DETERMINISTIC_ATTENTION triton`` (the default): torch's side is that of ``fused`` (the other attentions,
    e.g. HDM's masked ones, still run flash or memory-efficient); the CLIP tower reads the key
    (tests/modeling/test_demo.py)."""
    seed_everything(0, deterministic=True, attention="triton")
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_new_tensors_are_filled_only_when_asked() -> None:
    seed_everything(0, deterministic=True)
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    seed_everything(0, deterministic=True, fill_uninitialized=True)
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    assert torch.isnan(torch.empty(8)).all()  # torch's fill: NaN, the same every run
    seed_everything(0, deterministic=False)
    assert torch.utils.deterministic.fill_uninitialized_memory is True  # torch's own default again


def test_config_defaults_and_the_testbeds_that_keep_the_math_kernel() -> None:
    cfg = load_config(REPO / "configs" / "synthetic" / "DeMo_SDTPS_tiny.yml", [])
    assert cfg.DETERMINISTIC_ATTENTION == "triton" and cfg.DETERMINISTIC_FILL_UNINITIALIZED is False
    for name in ("DeMo_SDTPS_pretrained.yml", "Pretrain_tower_small.yml", "Pretrain_tower_tiny.yml",
                 "ExpB1_testbed_pretrain.yml", "ExpB1_testbed.yml", "Text_tower_testbed.yml"):
        cfg = load_config(REPO / "configs" / "synthetic" / name, [])
        assert cfg.DETERMINISTIC and cfg.DETERMINISTIC_ATTENTION == "math", name


def test_forward_only_kernels_relax_strict_mode_inside_and_restore_it_after() -> None:
    seed_everything(0, deterministic=True)
    with forward_only_kernels():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.raises(KeyError), forward_only_kernels():  # restored on the way out of an error too
        raise KeyError("x")
    assert not torch.is_deterministic_algorithms_warn_only_enabled()

    @forward_only_kernels()
    def inside() -> bool:
        return torch.is_deterministic_algorithms_warn_only_enabled()

    assert inside() and not torch.is_deterministic_algorithms_warn_only_enabled()


def test_forward_only_kernels_change_nothing_without_strict_mode() -> None:
    seed_everything(0, deterministic=False)
    with forward_only_kernels():
        assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own warn-only setting stays as it is
    with forward_only_kernels():
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


def test_the_reid_evaluation_extracts_features_under_forward_only_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ReID evaluation is where cuDNN's attention may run under DETERMINISTIC: its feature pass sees
    warn-only deterministic algorithms, and training after it strict ones again."""
    from engine.device import build_amp_policy
    from engine.reid.evaluator import extract_features

    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def forward(self, images: dict, camids: torch.Tensor, masks: torch.Tensor) -> dict:
            seen.append(torch.is_deterministic_algorithms_warn_only_enabled())
            return {"feat": torch.zeros(len(camids), 2)}

    batch = {"images": {m: torch.zeros(2, 3, 4, 4) for m in ("RGB", "NI", "TI")}, "masks": torch.ones(2, 3, dtype=torch.bool),
             "pids": torch.tensor([0, 1]), "camids": torch.tensor([0, 1]), "trackids": torch.tensor([0, 0])}
    seed_everything(0, deterministic=True)
    extract_features(Probe(), [batch], torch.device("cpu"), build_amp_policy("fp32", torch.device("cpu")),
                     keep=("RGB", "NI", "TI"), miss_mode="mask")
    assert seen == [True] and not torch.is_deterministic_algorithms_warn_only_enabled()
