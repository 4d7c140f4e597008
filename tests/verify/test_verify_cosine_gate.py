"""verify/verify_cosine_gate.py passes on the library and fails (exit 1) on each injected regression."""

from __future__ import annotations

import pytest

from modeling.module.token_selection import CrossModalAttention, TokenSparse
from tests.helpers.verify_scripts import run_verify_script
from verify import verify_cosine_gate


def test_script_passes_and_prints_the_table() -> None:
    proc = run_verify_script("verify_cosine_gate.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cosine  old gate  new gate" in proc.stdout
    assert "-1.0   0.27      0.50" in proc.stdout and "+1.0   0.73      0.73" in proc.stdout
    assert "[FAIL]" not in proc.stdout and "all checks passed" in proc.stdout


@pytest.mark.parametrize("bug", verify_cosine_gate.BUGS)
def test_each_injected_bug_exits_1(bug: str, capsys: pytest.CaptureFixture[str]) -> None:
    init, fwd, ts_fwd = CrossModalAttention.__init__, CrossModalAttention.forward, TokenSparse.forward
    assert verify_cosine_gate.main(["--inject-bug", bug]) == 1
    assert "[FAIL]" in capsys.readouterr().out
    # the patch is undone: the library is intact afterwards
    assert (CrossModalAttention.__init__, CrossModalAttention.forward, TokenSparse.forward) == (init, fwd, ts_fwd)


def test_broken_default_init_fails_via_env_style_monkeypatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A regression in the real defaults (not the script's injector) is caught too."""
    original = CrossModalAttention.__init__

    def regressed(self, embed_dim, num_heads, use_gate_norm=False, renormalize_attn=False, init_scale=0.5,
                  init_bias=0.0, **kw):
        original(self, embed_dim, num_heads, use_gate_norm, renormalize_attn, init_scale, init_bias, **kw)

    monkeypatch.setattr(CrossModalAttention, "__init__", regressed)
    assert verify_cosine_gate.main([]) == 1
