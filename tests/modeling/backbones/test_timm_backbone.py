"""The timm backbone wrapper: weights from a local file only, a clear error for a missing one."""

from __future__ import annotations

import pytest
import torch

from modeling import build_backbone


def test_timm_backbone_loads_local_weights_only(tmp_path) -> None:
    src = build_backbone("timm", timm_name="test_resnet")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.model.state_dict()}, path)
    dst = build_backbone("timm", timm_name="test_resnet", weights=str(path))
    for (k, a), b in zip(src.model.state_dict().items(), dst.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        build_backbone("timm", timm_name="test_resnet", weights=str(tmp_path / "missing.pth"))
