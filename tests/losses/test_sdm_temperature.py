"""SDMTemperature: the annealed schedule, the fallback after a non-finite loss, the clamp, resuming."""

from __future__ import annotations

import pytest

from losses import SDMTemperature


def test_temperature_schedule_fallback_clamp_and_resume() -> None:
    t = SDMTemperature(init=0.20, final=0.18, fallback=0.25, anneal_epochs=10, fallback_steps=3)
    assert t.scheduled(0) == pytest.approx(0.20)
    assert t.scheduled(5) == pytest.approx(0.19)
    assert t.scheduled(10) == pytest.approx(0.18)
    assert t.scheduled(50) == pytest.approx(0.18)
    t.set_epoch(5)
    assert t.observe(1.0) == pytest.approx(0.19)
    assert t.observe(float("nan")) == pytest.approx(0.25)
    state = t.state_dict()
    resumed = SDMTemperature(init=0.20, final=0.18, fallback=0.25, anneal_epochs=10, fallback_steps=3)
    resumed.load_state_dict(state)
    for tt in (t, resumed):
        assert [tt.observe(1.0) for _ in range(3)] == pytest.approx([0.25, 0.25, 0.19])
        assert tt.num_fallbacks == 1
    wild = SDMTemperature(init=0.05, final=0.9, fallback=2.0, anneal_epochs=1)
    assert wild.scheduled(0) == 0.15 and wild.scheduled(1) == 0.5
    wild.observe(float("inf"))
    assert wild.value() == 0.5
