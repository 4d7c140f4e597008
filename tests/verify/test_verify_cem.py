"""verify/verify_cem.py run as users run it: exit 0 as shipped, exit 1 with the encoder's input detached."""

from __future__ import annotations

from tests.helpers.verify_scripts import assert_one_failure, assert_passes


def test_verify_script_passes() -> None:
    assert "all checks passed" in assert_passes("verify_cem.py", timeout=120).stdout


def test_verify_script_fails_on_injected_bug() -> None:
    assert_one_failure("verify_cem.py", "detach_input", "gradient reaches the encoder", timeout=120)
