"""verify/verify_patch3.py and verify/verify_optimizer.py: pass on the real model, fail on broken ones."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "verify"))

import verify_optimizer  # noqa: E402
import verify_patch3  # noqa: E402

from engine.config import load_config  # noqa: E402
from modeling.layers.bounded_scale import BoundedScale  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "Base-FewShot.yml")


@pytest.fixture()
def model():
    return verify_patch3.build_default_model()


def test_scripts_pass_from_the_repo_root() -> None:
    for script, marker in (("verify/verify_patch3.py", "verify_patch3: 12 passed, 0 failed"),
                           ("verify/verify_optimizer.py", "verify_optimizer: 7 passed, 0 failed")):
        res = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert marker in res.stdout and "[FAIL]" not in res.stdout
        assert "initial scale = 25.00" in res.stdout or "exactly two parameter groups" in res.stdout


def test_patch3_values_reported(model) -> None:
    checks = {c.name: c for c in verify_patch3.run_checks(model)}
    assert all(c.ok for c in checks.values())
    ent = next(c for n, c in checks.items() if n.startswith("5-way attention entropy"))
    assert float(ent.value.split()[0]) < math.log(5)


def test_patch3_catches_an_unclamped_scale(model) -> None:
    model.sap.logit_scale = BoundedScale(25.0, max_value=None, constraint="none")  # no ceiling
    failed = [c.name for c in verify_patch3.run_checks(model) if not c.ok]
    assert any("exactly 100" in n for n in failed) and any("no gradient" in n for n in failed)


def test_patch3_catches_the_old_temperature_and_exits_1(capsys) -> None:
    assert verify_patch3.main(["--inject-bug", "temperature"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] no temperature attribute" in out and "[FAIL] logit_scale_log is a trainable nn.Parameter" in out


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
