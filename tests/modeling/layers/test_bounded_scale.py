"""BoundedScale: values by hand, bounds, gradients, stats, warnings."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from modeling.layers import BoundedScale


def test_sap_style_log_clamp_scale() -> None:
    """SAP: scale = exp(p).clamp(max=100), p = log 25 at init; log 200 gives exactly 100."""
    s = BoundedScale(25.0, max_value=100.0)
    assert isinstance(s.raw, nn.Parameter)
    assert s.raw.item() == pytest.approx(math.log(25.0))
    assert s().item() == pytest.approx(25.0, rel=1e-6)
    with torch.no_grad():
        s.raw.fill_(math.log(200.0))
    assert s().item() == 100.0
    assert [n for n, _ in s.named_parameters()] == ["raw"]


def test_parameter_can_be_aliased_by_a_model() -> None:
    class Sap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = BoundedScale(25.0, max_value=100.0)

        @property
        def logit_scale_log(self) -> nn.Parameter:
            return self.logit_scale.raw

    m = Sap()
    assert isinstance(m.logit_scale_log, nn.Parameter)
    assert any(p is m.logit_scale_log for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == 1


@pytest.mark.parametrize("param", ["log", "raw"])
def test_sigmoid_mode_formula_and_init(param: str) -> None:
    lo, hi = 0.5, 5.0
    s = BoundedScale(2.5, lo, hi, parameterization=param, constraint="sigmoid")
    assert s().item() == pytest.approx(2.5, rel=1e-5)
    with torch.no_grad():
        s.raw.fill_(0.7)
    u = 1 / (1 + math.exp(-0.7))
    expected = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u) if param == "log" else lo + (hi - lo) * u
    assert s().item() == pytest.approx(expected, rel=1e-6)
    for big in (1e3, -1e3):
        with torch.no_grad():
            s.raw.fill_(big)
        assert lo <= s().item() <= hi


def test_clamp_has_no_gradient_beyond_the_bound_sigmoid_does() -> None:
    c = BoundedScale(2.5, 0.5, 5.0, constraint="clamp")
    c.set_value(8.0)
    c().backward()
    assert c.raw.grad.item() == 0.0
    s = BoundedScale(2.5, 0.5, 5.0, constraint="sigmoid")
    s.set_value(4.9)
    s().backward()
    assert s.raw.grad.item() > 0.0


def test_penalty_values_by_hand() -> None:
    s = BoundedScale(2.0, parameterization="raw", constraint="penalty", penalty_coef=0.5)
    s.set_value(5.0)
    assert s.penalty().item() == pytest.approx(0.5 * 9.0)
    s.penalty().backward()
    assert s.raw.grad.item() == pytest.approx(2 * 0.5 * 3.0)  # d/dp coef (p - init)^2
    per_head = BoundedScale(torch.tensor([1.0, 2.0]), parameterization="raw", constraint="penalty",
                            penalty_coef=0.1, shape=(2,))
    per_head.set_value(torch.tensor([2.0, 4.0]))
    assert per_head.penalty().item() == pytest.approx(0.1 * (1.0 + 4.0))
    assert BoundedScale(2.0, constraint="clamp").penalty().item() == 0.0


def test_penalty_mode_still_clamps_when_bounds_given() -> None:
    s = BoundedScale(2.0, 0.5, 3.0, constraint="penalty", penalty_coef=0.1)
    s.set_value(10.0)
    assert s().item() == pytest.approx(3.0)
    assert s.penalty().item() == pytest.approx(0.1 * 1.0)


def test_none_mode_is_unbounded() -> None:
    s = BoundedScale(2.0, 0.5, 3.0, constraint="none")
    s.set_value(10.0)
    assert s().item() == pytest.approx(10.0, rel=1e-6)
    assert s.stats()["at_bound"] == 1.0  # reported as beyond the bound


def test_per_head_shape_and_at_bound_fraction() -> None:
    s = BoundedScale(1.0, 0.5, 5.0, shape=(4,))
    assert s().shape == (4,)
    s.set_value(torch.tensor([1.0, 6.0, 0.1, 2.0]))
    s()
    s()
    st = s.stats()
    # call 1: 0 of 4 at a bound; calls 2 and 3: 2 of 4 each -> 4 / 12.
    assert st["at_bound"] == pytest.approx(4 / 12)
    assert st["value"] == pytest.approx((1.0 + 5.0 + 0.5 + 2.0) / 4, rel=1e-6)
    assert st["value_max"] == pytest.approx(5.0)
    s.stats(reset=True)
    assert s.stats()["at_bound"] == 0.0


def test_not_learnable_is_a_buffer() -> None:
    s = BoundedScale(2.5, 0.5, 5.0, learnable=False)
    assert list(s.parameters()) == []
    assert "raw" in s.state_dict()
    assert s().item() == pytest.approx(2.5, rel=1e-6)


def test_state_dict_round_trip() -> None:
    a = BoundedScale(2.5, 0.5, 5.0, constraint="sigmoid")
    a.set_value(4.0)
    b = BoundedScale(2.5, 0.5, 5.0, constraint="sigmoid")
    b.load_state_dict(a.state_dict())
    assert b().item() == pytest.approx(4.0, rel=1e-5)


def test_warning_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    s = BoundedScale(5.0, warn_threshold=4.0, warn_every=10, name="gate_scale")
    with caplog.at_level(logging.WARNING, logger="modeling.layers.bounded_scale"):
        for _ in range(35):
            s()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4  # calls 1, 11, 21, 31
    assert "gate_scale" in msgs[0] and "4" in msgs[0]
    assert s.warnings_issued == 4
    caplog.clear()
    quiet = BoundedScale(3.0, warn_threshold=4.0, warn_every=1)
    with caplog.at_level(logging.WARNING, logger="modeling.layers.bounded_scale"):
        for _ in range(5):
            quiet()
    assert not caplog.records


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init=2.0, min_value=3.0, max_value=1.0), "min_value < max_value"),
        (dict(init=9.0, max_value=5.0), "above max_value"),
        (dict(init=-1.0), "init > 0"),
        (dict(init=2.0, constraint="sigmoid"), "both min_value and max_value"),
        (dict(init=2.0, constraint="bogus"), "constraint"),
        (dict(init=2.0, parameterization="exp"), "parameterization"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BoundedScale(**kwargs)


def test_set_value_rejects_non_positive_for_log() -> None:
    with pytest.raises(ValueError, match="> 0"):
        BoundedScale(2.0).set_value(0.0)
    raw = BoundedScale(2.0, parameterization="raw")
    raw.set_value(-1.0)
    assert raw().item() == -1.0


def test_a_compiled_scale_still_warns_every_n_calls_and_compiles_once(caplog: pytest.LogCaptureFixture) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    s = BoundedScale(5.0, warn_threshold=4.0, warn_every=10, name="gate_scale")
    counter = CompileCounter()
    compiled = torch.compile(lambda: s() * 2.0, backend=counter)
    with caplog.at_level(logging.WARNING, logger="modeling.layers.bounded_scale"):
        for _ in range(35):
            compiled()
    assert s.warnings_issued == 4 and len(caplog.records) == 4  # calls 1, 11, 21, 31, as eagerly
    assert counter.frame_count <= 2  # the graph around the host-side check, compiled once (not once per call)
