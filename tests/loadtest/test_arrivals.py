"""Arrival times: gamma gaps with mean 1/rate and coefficient of variation 1/sqrt(burstiness)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrivals import inter_arrival_gaps, send_times

N = 4000


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_moments(rate: float, burstiness: float) -> None:
    gaps = inter_arrival_gaps(N, rate, burstiness, seed=7)
    mean, cv = gaps.mean(), gaps.std() / gaps.mean()
    # Standard error of the mean is cv/sqrt(N) relative (<= 3.2% here): allow ~4 sigma.
    assert mean == pytest.approx(1 / rate, rel=4 * (1 / math.sqrt(burstiness)) / math.sqrt(N))
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def _ks_exponential(samples: np.ndarray, rate: float) -> float:
    """Kolmogorov-Smirnov distance between the sample's ECDF and Exp(rate)'s CDF."""
    x = np.sort(samples)
    cdf = 1.0 - np.exp(-rate * x)
    n = len(x)
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(0, n) / n
    return float(max(upper.max(), lower.max()))


def test_burstiness_one_is_poisson() -> None:
    rate = 3.0
    d = _ks_exponential(inter_arrival_gaps(N, rate, 1.0, seed=11), rate)
    # Critical value at alpha = 0.01 is 1.63/sqrt(n).
    assert d < 1.63 / math.sqrt(N)


def test_ks_rejects_bursty_as_poisson() -> None:
    """The check above has teeth: gamma(0.25) gaps with the same mean are not exponential."""
    rate = 3.0
    d = _ks_exponential(inter_arrival_gaps(N, rate, 0.25, seed=11), rate)
    assert d > 1.63 / math.sqrt(N)


def test_inf_rate_sends_everything_at_once() -> None:
    assert send_times(5, math.inf, 1.0).tolist() == [0.0] * 5


def test_seeded_and_increasing() -> None:
    a, b = send_times(100, 2.0, 0.5, seed=3), send_times(100, 2.0, 0.5, seed=3)
    assert np.array_equal(a, b)
    assert np.all(np.diff(a) >= 0)
    assert not np.array_equal(a, send_times(100, 2.0, 0.5, seed=4))


@pytest.mark.parametrize(("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_rejects_bad_parameters(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        inter_arrival_gaps(3, rate, burstiness)
