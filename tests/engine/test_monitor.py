"""SpikeDetector and NonFiniteGuard: thresholds by hand, the MAD floors, resume, skip and stop."""

from __future__ import annotations

import logging
import random
import statistics

import pytest
import torch

from engine.monitor import NonFiniteGuard, NonFiniteLossError, SpikeDetector


def hand_threshold(window: list[float], mad_floor=0.05, rel_floor=0.15, k=6.0) -> float:
    med = statistics.median(window)
    mad = statistics.median([abs(v - med) for v in window])
    return med + k * 1.4826 * max(mad, mad_floor, rel_floor * abs(med))


def test_no_decision_during_warmup() -> None:
    det = SpikeDetector(window=100, warmup=20)
    for i in range(20):
        assert det.threshold() is None
        assert det.update(1.0 + 100.0 * (i == 10)) is False  # even a huge value: still warming up
    assert det.spikes == 0 and det.checked == 0 and det.stability == 1.0
    assert det.threshold() is not None  # the 21st value will be judged


def test_threshold_matches_hand_formula() -> None:
    rng = random.Random(0)
    det = SpikeDetector(window=100, warmup=20)
    values = [2.0 + rng.gauss(0, 0.5) for _ in range(150)]
    for v in values:
        det.update(v)
    window = values[-100:]
    assert det.threshold() == pytest.approx(hand_threshold(window))
    # MAD of N(0, 0.5) ~ 0.34 > both floors (0.05 and 0.15 * 2 = 0.30): the raw MAD rules.
    med = statistics.median(window)
    assert statistics.median([abs(v - med) for v in window]) > 0.30


def test_floors_on_a_flat_loss() -> None:
    # Flat loss: MAD = 0. Without the MAD floors any jitter would be a spike (a stability score of 0.00).
    det = SpikeDetector(window=100, warmup=20)
    for _ in range(30):
        det.update(0.2)
    # relative floor 0.15 * 0.2 = 0.03 < absolute floor 0.05 -> threshold = 0.2 + 6 * 1.4826 * 0.05
    assert det.threshold() == pytest.approx(0.2 + 6 * 1.4826 * 0.05)
    assert det.update(0.5) is False  # jitter of +0.3 on a flat 0.2 loss is below 0.645
    assert det.update(0.7) is True
    big = SpikeDetector(window=100, warmup=20)
    for _ in range(30):
        big.update(5.0)
    # relative floor 0.75 rules at a loss level of 5: threshold = 5 + 6 * 1.4826 * 0.75
    assert big.threshold() == pytest.approx(5.0 + 6 * 1.4826 * 0.75)
    assert big.update(10.0) is False and big.update(12.0) is True


def test_counts_spikes_and_stability() -> None:
    rng = random.Random(1)
    det = SpikeDetector()
    n_spikes = 0
    for step in range(400):
        v = 1.0 + rng.gauss(0, 0.05)
        if step >= 50 and step % 50 == 0:
            v = 10.0
            n_spikes += 1
        det.update(v)
    assert det.spikes == n_spikes == 7
    assert det.checked == 400 - 20  # the first 20 values only fill the window; the 21st is the first judged
    assert det.stability == pytest.approx(1 - 7 / det.checked)


def test_non_finite_value_is_a_spike_and_not_stored() -> None:
    det = SpikeDetector(warmup=5, window=10)
    for _ in range(5):
        det.update(1.0)
    assert det.update(float("nan")) is True
    assert len(det.history) == 5
    assert det.update(float("inf")) is True
    assert det.spikes == 2


def test_state_dict_resume_continues_identically() -> None:
    rng = random.Random(2)
    values = [1.0 + rng.gauss(0, 0.1) + (5.0 if i % 37 == 36 else 0.0) for i in range(300)]
    straight = SpikeDetector()
    flags_straight = [straight.update(v) for v in values]
    first = SpikeDetector()
    flags = [first.update(v) for v in values[:130]]
    state = first.state_dict()
    resumed = SpikeDetector()
    resumed.load_state_dict(state)
    flags += [resumed.update(v) for v in values[130:]]
    assert flags == flags_straight
    assert resumed.spikes == straight.spikes and resumed.stability == straight.stability


def test_bad_detector_config() -> None:
    with pytest.raises(ValueError):
        SpikeDetector(window=10, warmup=20)


# ----------------------------------------------------------------------------- NonFiniteGuard
def test_guard_passes_finite_and_names_bad_terms(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check({"id": torch.tensor(1.0), "sdm": 0.5}, grad_norm=torch.tensor(2.0)) is True
    with caplog.at_level(logging.WARNING, logger="engine.monitor"):
        ok = guard.check({"id": torch.tensor(1.0), "sdm": torch.tensor(float("nan"))}, grad_norm=torch.tensor(2.0))
    assert ok is False
    assert guard.last_bad == ["sdm"]
    assert "sdm" in caplog.text and "skipped" in caplog.text
    assert guard.check({"id": torch.tensor(1.0)}, grad_norm=float("inf")) is False
    assert guard.last_bad == ["grad_norm"]
    assert guard.skipped == 2 and guard.consecutive == 2
    assert guard.check({"id": torch.tensor(1.0)}) is True
    assert guard.consecutive == 0 and guard.skipped == 2
    assert guard.stats()["nonfinite_rate"] == pytest.approx(2 / 4)


def test_guard_raises_after_max_consecutive() -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    bad = {"triplet": torch.tensor(float("inf")), "id": torch.tensor(0.3)}
    assert guard.check(bad) is False
    assert guard.check(bad) is False
    with pytest.raises(NonFiniteLossError, match=r"3 training steps in a row.*triplet.*MAX_NONFINITE_STEPS") as info:
        guard.check(bad)
    assert "checkpoint" not in str(info.value)  # the guard knows nothing of checkpoints: the trainer says


def test_blowup_is_judged_against_the_spike_band() -> None:
    det = SpikeDetector(window=100, warmup=20, mad_floor=0.05, rel_floor=0.15, n_sigmas=6.0)
    assert not det.is_blowup(1e9, 10.0)  # warm-up: nothing is judged
    for v in [1.0] * 25:
        det.update(v)
    # median 1.0, MAD 0 -> floors: max(0.05, 0.15 * 1.0) = 0.15; band = 6 * 1.4826 * 0.15 = 1.33434
    band = 6 * 1.4826 * 0.15
    assert det.is_blowup(1.0 + 10 * band + 1e-6, 10.0) and not det.is_blowup(1.0 + 10 * band - 1e-6, 10.0)
    assert not det.is_blowup(1e9, 0.0)  # off
    assert det.is_blowup(float("nan"), 10.0)
    assert det.steps == 25  # judging changes nothing


def test_guard_checks_every_element_and_state_dict() -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard.check({"vec": torch.tensor([1.0, float("nan")])}) is False
    resumed = NonFiniteGuard(max_consecutive=2)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.consecutive == 1 and resumed.bad_counts == {"vec": 1}
    with pytest.raises(NonFiniteLossError):
        resumed.check({"vec": torch.tensor(float("nan"))})


def test_skipped_step_is_not_applied() -> None:
    """The documented loop: a NaN step leaves the parameters untouched."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.tensor([[float("nan"), 1.0, 2.0]])
    loss = model(x).sum()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    if guard.check({"loss": loss}, grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert guard.skipped == 1
