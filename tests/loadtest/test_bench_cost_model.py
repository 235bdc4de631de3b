"""The cost-model benchmark's noise floor: deviation of repeated shapes from their median."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.bench_cost_model import repeat_noise
from server.spec_decode.cost_model import StepShape


def test_repeat_noise_measures_spread_within_identical_shapes_only() -> None:
    a, b, c = StepShape(1, 1, 10, 1), StepShape(4, 4, 40, 4), StepShape(9, 9, 90, 9)
    shapes = [a, a, a, b, b, b, b, c, c]  # c ran twice: too few to have a median worth using
    measured = np.array([1.0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5, 1.0, 9.0])
    errors = repeat_noise(shapes, measured)
    # a: median 1.0 -> 0, 0, |2 - 1| / 2; b: all at the median; c left out.
    assert sorted(errors.tolist()) == pytest.approx([0, 0, 0, 0, 0, 0, 0.5])
    assert len(repeat_noise([a, b], np.array([1.0, 2.0]))) == 0
    # Decode steps grow their KV by a few tokens each: still the same shape within a bucket.
    grown = [StepShape(4, 4, 40 + i, 4) for i in range(3)] + [StepShape(4, 4, 400, 4)]
    assert len(repeat_noise(grown, np.array([1.0, 1.0, 1.0, 1.0]), kv_bucket=128)) == 3
