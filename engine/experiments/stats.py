"""Summaries of one measurement over seeds: mean and spread, and the seed-paired difference of two rows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping


def mean_and_std(values: Mapping[int, float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of ``values`` (by seed); std 0 for one value, NaN for none."""
    vals = list(values.values())
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def paired_seed_difference(row: Mapping[int, float], ref: Mapping[int, float],
                           level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half-width, n)`` of the per-seed differences ``row[s] - ref[s]`` over the ``n`` seeds both have.

    Same seed, same data order (and, where the architectures allow, the same init): the seed-to-seed spread
    the two rows share cancels. The interval is ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` (Student t,
    ``sd`` with n - 1); its half-width is NaN below two pairs, and everything is NaN with no pair.
    """
    from scipy.stats import t as student_t  # scipy comes with scikit-learn (requirements.txt)

    diffs = [row[s] - ref[s] for s in sorted(set(row) & set(ref))]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, n
    return mean, float(student_t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n), n
