"""The ReID training step queues its work without waiting for the GPU: checked on fake CUDA tensors (CPU)."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.reid import build_reid_model
from losses.reid_criterion import ReIDCriterion
from utils.host_sync import HostSyncAudit, fake_cuda

TINY = "configs/synthetic/DeMo_SDTPS_tiny.yml"
MODALITIES = ("RGB", "NI", "TI")


def _batch(cfg, b: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = cfg.INPUT.SIZE_TRAIN
    gen = torch.Generator().manual_seed(0)
    images = {m: torch.randn(b, 3, h, w, generator=gen) for m in MODALITIES}
    pids = torch.arange(b) // 2
    masks = torch.ones(b, 3, dtype=torch.bool)
    masks[0, 1] = False  # one sample without NIR: the masked SDM path runs too
    return images, torch.zeros(b, dtype=torch.long), pids, masks


def test_audit_flags_what_waits_for_the_device() -> None:
    """The audit itself: a scalar written through an index, a list index, a host copy, ``item`` and a boolean
    mask index are caught; device-only arithmetic is not."""
    with fake_cuda() as to_cuda:
        x = to_cuda(torch.randn(4, 4))
        with HostSyncAudit() as quiet:
            y = (x * 2.0).masked_fill(torch.eye(4, dtype=torch.bool, device="cuda"), 0.0).sum(1)
            torch.where(y > 0, y, torch.zeros_like(y))
        with HostSyncAudit() as loud:
            mask = torch.zeros(4, 4, dtype=torch.bool, device="cuda")
            mask[torch.arange(4, device="cuda"), torch.arange(4, device="cuda")] = True
            x[:, [0, 2]]
            torch.ones(3).to("cuda")
            with pytest.raises(Exception):  # noqa: B017 - a fake tensor has no value to read back
                x.sum().item()
            with pytest.raises(Exception):  # noqa: B017 - nor a size that depends on its values
                x[x > 0]
    assert quiet.found == []
    first = test_audit_flags_what_waits_for_the_device.__code__.co_firstlineno
    lines = {int(f.rsplit(":", 1)[1]) - first for f in loud.found if "test_host_sync.py" in f}
    assert lines == {10, 11, 12, 14, 16}, loud.found  # each of the five lines above, named as the culprit
    assert any("index_put" in f for f in loud.found) and any("_local_scalar_dense" in f for f in loud.found)


@pytest.mark.parametrize("overrides", [[], ["LOSS.SDM.FORMULA", "legacy"], ["LOSS.SDM.CENTER", "True"]])
def test_reid_criterion_never_waits_for_the_device(overrides: list[str]) -> None:
    """The eager loss of the compiled-model step: its triplet, ID, SDM (masked) and feature-norm terms."""
    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    model = build_reid_model(cfg, 4, 1).train()
    images, camids, pids, masks = _batch(cfg)
    outputs = model(images, camids, masks)
    criterion = ReIDCriterion(cfg, bn_feat_dim=getattr(model, "bn_feat_dim", None))
    with fake_cuda() as to_cuda:
        outputs, pids, masks, criterion = to_cuda(outputs), to_cuda(pids), to_cuda(masks), to_cuda(criterion)
        with HostSyncAudit() as audit:
            total, terms = criterion(outputs, pids, masks, epoch=1.0)
    assert total.device.type == "cuda" and {"sdm", "triplet/fused"} <= set(terms)
    assert audit.found == []


@pytest.mark.parametrize("train", [True, False])
def test_reid_model_forward_never_waits_for_the_device(train: bool) -> None:
    """The model's forward (the eager step, and the evaluation) on fake CUDA."""
    cfg = load_config(TINY)
    model = build_reid_model(cfg, 4, 1).train(train)
    images, camids, _, masks = _batch(cfg)
    with fake_cuda() as to_cuda:
        model, images, camids, masks = to_cuda(model), to_cuda(images), to_cuda(camids), to_cuda(masks)
        with HostSyncAudit() as audit:
            model(images, camids, masks)
    assert audit.found == []
