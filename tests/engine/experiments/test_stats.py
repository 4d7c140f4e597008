"""engine/experiments/stats.py: mean and spread over seeds, and the seed-paired Student-t interval, against numbers
computed by hand."""

from __future__ import annotations

import math

import pytest

from engine.experiments.stats import mean_and_std, paired_seed_difference

T975_2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)
T975_3 = 3.182446305284263  # 3 degrees of freedom (tables: 3.182)
T95_2 = 2.919985580355516  # 95% quantile, 2 degrees of freedom (a 90% interval; tables: 2.920)


def test_mean_and_sample_std() -> None:
    assert mean_and_std({0: 0.1, 1: 0.2, 2: 0.3}) == pytest.approx((0.2, 0.1))  # sd: sqrt((0.01 + 0 + 0.01) / 2)
    assert mean_and_std({4: 0.7}) == (0.7, 0.0)
    assert all(math.isnan(x) for x in mean_and_std({}))


def test_paired_seed_difference_against_a_hand_computed_case() -> None:
    ref = {0: 0.50, 1: 0.60, 2: 0.55}
    near = {0: 0.53, 1: 0.62, 2: 0.60, 3: 0.99}  # seed 3 has no partner: left out
    far = {0: 0.60, 1: 0.71, 2: 0.65}
    # near: differences 0.03, 0.02, 0.05 -> mean 1/30, sd sqrt(7/30000), half-width t * sd / sqrt(3)
    mean, half, n = paired_seed_difference(near, ref)
    assert n == 3 and mean == pytest.approx(1 / 30) and half == pytest.approx(T975_2 * (7 / 30000) ** 0.5 / 3 ** 0.5)
    # far: differences 0.10, 0.11, 0.10 -> mean 0.31/3, sd sqrt(1/30000)
    mean, half, _ = paired_seed_difference(far, ref)
    assert mean == pytest.approx(0.31 / 3) and half == pytest.approx(T975_2 * (1 / 30000) ** 0.5 / 3 ** 0.5)
    assert half == pytest.approx(0.014342, abs=1e-6)


def test_four_pairs_and_another_level() -> None:
    """Differences 1, 2, 3, 6: mean 3, sd sqrt(((-2)^2 + (-1)^2 + 0 + 3^2) / 3) = sqrt(14/3)."""
    row, ref = {0: 1.0, 1: 2.0, 2: 3.0, 3: 6.0}, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    mean, half, n = paired_seed_difference(row, ref)
    assert (mean, n) == (3.0, 4) and half == pytest.approx(T975_3 * (14 / 3) ** 0.5 / 2)
    _, half90, _ = paired_seed_difference({0: 0.53, 1: 0.62, 2: 0.60}, {0: 0.50, 1: 0.60, 2: 0.55}, level=0.90)
    assert half90 == pytest.approx(T95_2 * (7 / 30000) ** 0.5 / 3 ** 0.5)


def test_one_pair_has_no_interval_and_no_pair_has_nothing() -> None:
    mean, half, n = paired_seed_difference({0: 0.5, 1: 0.7}, {0: 0.4})
    assert mean == pytest.approx(0.1) and math.isnan(half) and n == 1
    mean, half, n = paired_seed_difference({0: 0.5}, {1: 0.4})
    assert math.isnan(mean) and math.isnan(half) and n == 0
