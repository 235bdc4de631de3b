"""The online cost model against step times generated from known coefficients."""

from __future__ import annotations

import numpy as np
import pytest

from server.spec_decode.cost_model import (
    FEATURES,
    CostModel,
    StepShape,
    feature_row,
    shapes_matrix,
)


def decode_shape(batch: int, drafts_each: int, context: int = 100) -> StepShape:
    rows = batch * (1 + drafts_each)
    return StepShape(
        num_tokens=rows,
        num_logit_rows=rows,
        num_kv_tokens=batch * context + rows,
        num_requests=batch,
        num_spec_requests=batch if drafts_each else 0,
    )


def true_seconds(shape: StepShape, few_rows_cost: dict[int, float] | None = None) -> float:
    """A CPU-like cost, nonlinear in few rows: the runner pads 2 and 3 rows up to 4 (the
    few-row path is faster at 4), so 2-4 rows cost alike, well above 1."""
    few_rows = (few_rows_cost or {2: 0.006, 3: 0.0052, 4: 0.0044}).get(shape.num_tokens, 0.0)
    verify = 0.001 + 0.0004 * shape.num_spec_requests if shape.num_spec_requests else 0.0
    return (
        0.015
        + 0.0008 * shape.num_tokens
        + 2e-6 * shape.num_kv_tokens
        + 0.0002 * shape.num_requests
        + few_rows
        + verify
    )


def training_shapes(rng: np.random.Generator, n: int) -> list[StepShape]:
    return [
        decode_shape(int(rng.integers(1, 17)), int(rng.integers(0, 6)), int(rng.integers(20, 400)))
        for _ in range(n)
    ]


def test_recovers_a_nonlinear_cpu_cost_within_two_percent() -> None:
    rng = np.random.default_rng(0)
    model = CostModel(window=512)
    for shape in training_shapes(rng, 400):
        model.observe(shape, true_seconds(shape) * rng.normal(1.0, 0.01))
    held_out = training_shapes(rng, 100) + [decode_shape(1, k) for k in range(5)]
    errors = [abs(model.predict(s) - true_seconds(s)) / true_seconds(s) for s in held_out]
    assert np.median(errors) < 0.02
    # The few-row step is learned: the first draft costs most, the next two little.
    plain, one, three = (model.predict(decode_shape(1, k)) for k in (0, 1, 3))
    assert three - one < 0.5 * (one - plain)
    assert model.recent_relative_error < 0.05


def test_outlier_steps_do_not_move_the_fit() -> None:
    rng = np.random.default_rng(1)
    clean, dirty = CostModel(), CostModel()
    for i, shape in enumerate(training_shapes(rng, 300)):
        t = true_seconds(shape)
        clean.observe(shape, t)
        # One step in ten hit by a GC pause or a busy core: 3-8x slower.
        dirty.observe(shape, t * (rng.uniform(3, 8) if i % 10 == 0 else 1.0))
    probe = training_shapes(rng, 50)
    errors = [abs(dirty.predict(s) - true_seconds(s)) / true_seconds(s) for s in probe]
    assert np.median(errors) < 0.03


def test_profile_samples_stay_when_the_window_slides_past_them() -> None:
    model = CostModel(window=64, refit_every=4)
    profile = [
        (decode_shape(b, k), true_seconds(decode_shape(b, k))) for b in (1, 2, 8) for k in range(4)
    ]
    model.add_profile(profile)
    # Then only batch-16 steps for longer than the window.
    for _ in range(200):
        s = decode_shape(16, 0)
        model.observe(s, true_seconds(s) * 1.05)  # real steps cost a bit more than the profile
    s = decode_shape(1, 3)
    assert model.predict(s) == pytest.approx(true_seconds(s), rel=0.3)
    assert model.predict(decode_shape(16, 0)) == pytest.approx(
        1.05 * true_seconds(decode_shape(16, 0)), rel=0.02
    )


def test_given_coefficients_predict_exactly() -> None:
    model = CostModel.from_coefficients(
        {"intercept": 0.00694, "rows": 1.84e-5, "kv_tokens": 4.86e-8}
    )
    s = decode_shape(4, 2, context=500)
    assert model.predict(s) == pytest.approx(0.00694 + 1.84e-5 * 12 + 4.86e-8 * (2000 + 12))
    with pytest.raises(ValueError, match="unknown cost features"):
        CostModel.from_coefficients({"flops": 1.0})
    assert set(model.coefficients) == set(FEATURES)


def prefill_shape(chunk: int, batch: int) -> StepShape:
    """``batch`` decoding requests plus one request prefilling ``chunk`` tokens."""
    return StepShape(
        num_tokens=chunk + batch,
        num_logit_rows=batch + 1,
        num_kv_tokens=batch * 200 + chunk,
        num_requests=batch + 1,
    )


def test_a_few_quick_steps_past_a_knot_do_not_bend_the_price_of_larger_ones() -> None:
    """Served on 2 CPU cores, the few steps past 256 rows of one run turned the fitted slope
    beyond 256 rows from +4.6 to -0.9 ms a row: a 1024-row prefill step was priced at 0.5 s
    and took 4 s, and the draft rows added to it looked free. A slope changes at the large
    knots, as at the few-row ones, only where the data insist."""
    rng = np.random.default_rng(3)
    model = CostModel(window=512)
    for shape in training_shapes(rng, 300):
        model.observe(shape, true_seconds(shape) * rng.normal(1.0, 0.02))
    for chunk in (32, 64, 100, 150, 200, 240):  # prefill chunks up to the knot, on the line
        for batch in (0, 4):
            shape = prefill_shape(chunk, batch)
            model.observe(shape, true_seconds(shape) * rng.normal(1.0, 0.02))
    for chunk in (262, 270, 281):  # three quick ones just past it
        shape = prefill_shape(chunk, 2)
        model.observe(shape, true_seconds(shape) * 0.8)
    model.fit()
    big = prefill_shape(1024, 20)
    assert model.predict(big) == pytest.approx(true_seconds(big), rel=0.25)
    # Well measured large steps still move it: the data insist.
    for _ in range(40):
        for chunk in (400, 700, 1000):
            shape = prefill_shape(chunk, 10)
            model.observe(shape, true_seconds(shape) * 1.3 * rng.normal(1.0, 0.02))
    model.fit()
    assert model.predict(big) == pytest.approx(1.3 * true_seconds(big), rel=0.1)


def test_one_steps_features_in_plain_floats_match_the_matrix_path() -> None:
    """``observe`` and ``predict`` build one step's features without numpy; the policy
    prices many through ``shapes_matrix``: both must agree for every feature."""
    rng = np.random.default_rng(3)
    model = CostModel.from_coefficients({name: float(rng.uniform(0, 1e-3)) for name in FEATURES})
    for _ in range(200):
        shape = StepShape(*(int(v) for v in rng.integers(0, [600, 60, 9000, 40, 9, 5, 40]) + 1))
        assert feature_row(shape) == pytest.approx(shapes_matrix([shape])[0].tolist(), abs=0)
        matrix = model.predict_matrix(shapes_matrix([shape]))[0]
        assert model.predict(shape) == pytest.approx(matrix)
