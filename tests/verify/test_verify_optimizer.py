"""verify/verify_optimizer.py: passes on the real ExpB1 model's parameter groups, fails on broken ones."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from tests.helpers.verify_scripts import REPO, assert_passes
from verify import verify_optimizer
from verify.verify_patch3 import build_default_model


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "Base-FewShot.yml")


@pytest.fixture()
def model():
    return build_default_model()


def test_script_passes_from_the_repo_root() -> None:
    out = assert_passes("verify_optimizer.py").stdout
    assert "verify_optimizer: 7 passed, 0 failed" in out and "exactly two parameter groups" in out


def test_optimizer_check_catches_weight_decay_on_the_scale(model, cfg) -> None:
    good = model.get_parameters
    model.get_parameters = lambda: [good()[0], {"params": good()[1]["params"], "weight_decay": 5e-4}]
    failed = [c.name for c in verify_optimizer.run_checks(model, cfg) if not c.ok]
    assert "second group weight_decay = 0.0 (as given)" in failed
    assert any("leaves logit_scale_log unchanged" in n for n in failed)


@pytest.mark.parametrize("bug, expected", [
    ("one_group", "exactly two parameter groups"),
    ("duplicate", "every trainable parameter exactly once"),
    ("lost", "every trainable parameter exactly once"),
])
def test_optimizer_script_exits_1_on_broken_groups(bug, expected, capsys) -> None:
    assert verify_optimizer.main(["--inject-bug", bug]) == 1
    assert f"[FAIL] {expected}" in capsys.readouterr().out


def test_optimizer_checks_leave_the_model_unchanged(model, cfg) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(c.ok for c in verify_optimizer.run_checks(model, cfg))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
