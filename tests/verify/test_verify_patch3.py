"""verify/verify_patch3.py: passes on the real ExpB1 model, fails on broken ones."""

from __future__ import annotations

import math

import pytest

from modeling.layers.bounded_scale import BoundedScale
from tests.helpers.verify_scripts import assert_passes
from verify import verify_patch3


@pytest.fixture()
def model():
    return verify_patch3.build_default_model()


def test_script_passes_from_the_repo_root() -> None:
    out = assert_passes("verify_patch3.py").stdout
    assert "verify_patch3: 12 passed, 0 failed" in out and "initial scale = 25.00" in out


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
