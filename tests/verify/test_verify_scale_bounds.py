"""verify/verify_scale_bounds.py run as users run it: exit 0 as shipped, exit 1 with the clamp removed."""

from __future__ import annotations

from tests.helpers.verify_scripts import assert_one_failure, assert_passes


def test_verify_script_passes() -> None:
    assert "all checks passed" in assert_passes("verify_scale_bounds.py", timeout=120).stdout


def test_verify_script_fails_on_injected_bug() -> None:
    assert_one_failure("verify_scale_bounds.py", "no_clamp", "stays in [0.5, 5.0]", timeout=120)
