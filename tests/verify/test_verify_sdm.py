"""verify/verify_sdm.py run as users run it: exit 0 as shipped, exit 1 with the old formula injected."""

from __future__ import annotations

from tests.helpers.verify_scripts import assert_one_failure, assert_passes


def test_verify_script_passes() -> None:
    assert "all checks passed" in assert_passes("verify_sdm.py", timeout=120).stdout


def test_verify_script_fails_on_injected_bug() -> None:
    assert_one_failure("verify_sdm.py", "old_formula", "loss >= -1e-6", timeout=120)
