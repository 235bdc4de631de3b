"""The step-time cost model: predicts how long one engine step takes from what it computes.

The goodput policy weighs the tokens a draft is expected to add against the time it adds, so
it needs T(step) for steps it has not run yet. T is linear in a handful of features of the
step (``StepShape``) and fitted online by least squares on the engine's own measured steps,
so it is right for whatever model and device it serves, with no hand-entered coefficients:

- rows through the target (prefill chunks + 1 per decoding request + draft tokens), as a
  piecewise-linear function of rows with knots at 2, 3, 4, 6, 8, 12, 16, 64 and 256 rows.
  On CPU few-row steps are far from linear in rows (measured at batch 1 with int4 weights:
  24.5 ms at 1 row, 29.9 at 2, 29.6 at 3, 29.9 at 4, 32.9 at 5, 51 at 9), and on a GPU small
  batches cost the same whatever their size; free slopes between knots let the fit learn
  either;
- rows whose logits are computed (the LM head is a large matrix: a 49152 x 576 head is a
  fifth of SmolLM2-135M's weights);
- KV tokens attended (context lengths summed), requests in the batch, requests verifying a
  tree and whether any does (verification and compaction cost per request and per step);
- a draft model's forwards (sequential, one per chain position) and its rows (catch-up
  + drafts).

Fit: rows are weighted by 1 / measured time (least squares on relative error), a little
ridge (features scaled to unit RMS) keeps unseen features at zero, a stronger one on the
knots keeps the slope from changing at a knot unless the data insist (so a row count the
policy seldom runs is priced from its neighbours, and one past the largest steps seen by the
slope below them, not from a few noisy steps), and one
trimming pass drops outlier steps (GC pauses, a busy core) before the final fit. (The fit may
still price more rows below fewer where its data are noisy; the allocator never takes such a
dip: see ``allocator.py``.) The window holds the most
recent steps; the start-up profile's samples stay in the fit for good, with an indicator
feature of their own that absorbs what the profile does not time (scheduling, drafting
overhead of real steps), so row counts seen only in the profile stay calibrated.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Knots of the piecewise-linear price in rows: dense where few-row steps bend (the slope may
# change at each), sparse beyond. No knot at 1: no step has fewer rows, so the slope up to 2
# is the rows coefficient's.
_FEW_ROW_KNOTS = (2, 3, 4, 6, 8, 12, 16)
_LARGE_ROW_KNOTS = (64, 256)
_ROW_KNOTS = (*_FEW_ROW_KNOTS, *_LARGE_ROW_KNOTS)
FEATURES: tuple[str, ...] = (
    "intercept",
    "rows",
    "multi_row",
    *(f"rows_over_{k}" for k in _ROW_KNOTS),
    "logit_rows",
    "kv_tokens",
    "requests",
    "spec_requests",
    "verifying",
    "draft_forwards",
    "draft_rows",
    "profile",
)
_INDEX = {name: i for i, name in enumerate(FEATURES)}
_KNOTS = np.array(_ROW_KNOTS, dtype=np.float64)
# Ridge strength relative to the (weighted) data's scale: small enough to leave well-measured
# coefficients alone, large enough to zero features with no data.
_RIDGE = 1e-4
# Slope changes at the knots are shrunk harder: a row count's price departs from the line
# through its neighbours only where its data insist. Why, at the few-row knots: the policy
# picks the allocation whose price is lowest, and it runs few steps at the counts it avoids,
# so a count that noise priced high stays high and one priced low is sought out. Served at
# the lowest rate on the mix, a fit with a free price per row count (one indicator each)
# priced 3 rows 15 ms above 1 (measured offline: 5 ms) and 3 to 6 rows alike; goodput then
# drafted either nothing or 4 to 8 tokens, and fixed k = 2 beat it by 14%. At the large
# knots (64, 256) the steps past them are few (prefill bursts) and the slope beyond the last
# one extrapolates: with this ridge alone, a few quick steps just past 256 rows bent it by
# -5.5 ms a row in the 2026-12-04 headline sweep, a 1024-row step was priced at 0.5 s (it
# took 4 s), and the draft rows added to it looked free. There the ridge is at least that of
# _KNOT_PSEUDO_STEPS steps past the knot on the slope below it (see ``_weighted_ridge``).
_KNOT_RIDGE = 1e-2
_KNOT_PSEUDO_STEPS = 32
# Residuals beyond this many robust standard deviations (and at least 10%) are outliers.
_TRIM_SIGMAS = 3.0
_TRIM_FLOOR = 0.10
# No prediction below this (a step always costs something; an extrapolating fit may not know).
_MIN_SECONDS = 1e-5


@dataclass(frozen=True)
class StepShape:
    """What one engine step computes, as the cost model sees it."""

    # Rows through the target: prefill chunks + 1 per decoding request + draft tokens.
    num_tokens: int
    # Rows whose logits are computed: one per sampling request, every node of a draft tree.
    num_logit_rows: int
    # Context tokens the step's requests attend to (computed prefix + this step's tokens).
    num_kv_tokens: int
    num_requests: int
    # Requests verifying a draft tree this step.
    num_spec_requests: int = 0
    # Draft model work: forward passes (one per chain position) and rows (catch-up + drafts).
    num_draft_forwards: int = 0
    num_draft_rows: int = 0

    def with_drafts(
        self,
        num_drafts: int,
        num_spec_requests: int,
        num_draft_forwards: int = 0,
        num_draft_rows: int = 0,
    ) -> StepShape:
        """This (draft-free) shape plus ``num_drafts`` draft tokens over that many requests."""
        return StepShape(
            num_tokens=self.num_tokens + num_drafts,
            num_logit_rows=self.num_logit_rows + num_drafts,
            num_kv_tokens=self.num_kv_tokens + num_drafts,
            num_requests=self.num_requests,
            num_spec_requests=num_spec_requests,
            num_draft_forwards=num_draft_forwards,
            num_draft_rows=num_draft_rows,
        )


def feature_matrix(
    rows: np.ndarray,
    logit_rows: np.ndarray,
    kv_tokens: np.ndarray,
    requests: np.ndarray,
    spec_requests: np.ndarray,
    draft_forwards: np.ndarray,
    draft_rows: np.ndarray,
    profile: np.ndarray | None = None,
) -> np.ndarray:
    """[S, len(FEATURES)] float64 for S steps given as arrays of equal length."""
    rows = np.asarray(rows, dtype=np.float64)
    x = np.zeros((rows.shape[0], len(FEATURES)))
    x[:, _INDEX["intercept"]] = 1.0
    x[:, _INDEX["rows"]] = rows
    x[:, _INDEX["multi_row"]] = rows >= 2
    first = _INDEX[f"rows_over_{_ROW_KNOTS[0]}"]
    # All hinges in one broadcast (the policy prices every step's candidate allocations
    # through here).
    x[:, first : first + len(_ROW_KNOTS)] = np.maximum(rows[:, None] - _KNOTS, 0.0)
    x[:, _INDEX["logit_rows"]] = logit_rows
    x[:, _INDEX["kv_tokens"]] = kv_tokens
    x[:, _INDEX["requests"]] = requests
    spec = np.asarray(spec_requests, dtype=np.float64)
    x[:, _INDEX["spec_requests"]] = spec
    x[:, _INDEX["verifying"]] = spec > 0
    x[:, _INDEX["draft_forwards"]] = draft_forwards
    x[:, _INDEX["draft_rows"]] = draft_rows
    if profile is not None:
        x[:, _INDEX["profile"]] = profile
    return x


def feature_row(shape: StepShape) -> list[float]:
    """One measured step's features, as ``shapes_matrix`` gives them, in plain floats: the
    engine observes one step at a time, and numpy's per-call overhead would be most of it."""
    rows = float(shape.num_tokens)
    spec = float(shape.num_spec_requests)
    return [
        1.0,
        rows,
        float(rows >= 2),
        *(max(rows - k, 0.0) for k in _ROW_KNOTS),
        float(shape.num_logit_rows),
        float(shape.num_kv_tokens),
        float(shape.num_requests),
        spec,
        float(spec > 0),
        float(shape.num_draft_forwards),
        float(shape.num_draft_rows),
        0.0,  # profile
    ]


def shapes_matrix(shapes: Sequence[StepShape], profile: bool = False) -> np.ndarray:
    columns = np.array(
        [
            (
                s.num_tokens,
                s.num_logit_rows,
                s.num_kv_tokens,
                s.num_requests,
                s.num_spec_requests,
                s.num_draft_forwards,
                s.num_draft_rows,
            )
            for s in shapes
        ],
        dtype=np.float64,
    ).reshape(len(shapes), 7)
    return feature_matrix(*columns.T, np.full(len(shapes), float(profile)))


class CostModel:
    """Online least-squares step-time model; see the module docstring.

    ``predict`` / ``predict_matrix`` answer in seconds. ``observe`` adds a measured step and
    refits every ``refit_every`` observations. Before any data the model predicts a flat
    ``default_seconds`` per step, which makes every draft look free of cost: callers that need
    a fitted model seed it with ``add_profile`` first.
    """

    def __init__(
        self,
        window: int = 512,
        refit_every: int = 8,
        error_window: int = 128,
        default_seconds: float = 0.01,
    ) -> None:
        if window < len(FEATURES):
            raise ValueError(f"window must be >= {len(FEATURES)} steps, got {window}")
        # The window of measured steps as a ring of feature rows and seconds: a refit reads
        # it as is instead of re-stacking up to 512 rows out of a deque every time.
        self._x = np.zeros((window, len(FEATURES)))
        self._y = np.zeros(window)
        self._num_observed = 0
        self._anchor_x = np.zeros((0, len(FEATURES)))
        self._anchor_y = np.zeros(0)
        # The start-up profile's samples as given (for reports and refits).
        self.profile: list[tuple[StepShape, float]] = []
        self._errors: deque[float] = deque(maxlen=error_window)
        self._refit_every = max(1, refit_every)
        self._since_fit = 0
        self._coef = np.zeros(len(FEATURES))
        self._coef[_INDEX["intercept"]] = default_seconds
        self._coef_list = self._coef.tolist()  # for one-step predictions in plain floats
        self.num_fits = 0
        # Set to a list to record every observed (shape, predicted beforehand, measured).
        self.trace: list[tuple[StepShape, float, float]] | None = None

    @classmethod
    def from_coefficients(cls, coefficients: dict[str, float]) -> CostModel:
        """A fixed model (the simulator's given coefficients); ``observe`` still refits."""
        unknown = sorted(set(coefficients) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown cost features {unknown}; known: {list(FEATURES)}")
        model = cls(default_seconds=0.0)
        for name, value in coefficients.items():
            model._coef[_INDEX[name]] = value
        model._coef_list = model._coef.tolist()
        return model

    # ---- prediction ---------------------------------------------------------------------

    @property
    def coefficients(self) -> dict[str, float]:
        return {name: float(c) for name, c in zip(FEATURES, self._coef, strict=True)}

    @property
    def coefficient_vector(self) -> np.ndarray:
        """The fitted coefficients as an array, replaced (not changed in place) by each fit:
        callers may cache what they derive from one and compare by identity."""
        return self._coef

    def predict(self, shape: StepShape) -> float:
        return self._predict_row(feature_row(shape))

    def _predict_row(self, x: list[float]) -> float:
        return max(math.fsum(a * b for a, b in zip(x, self._coef_list, strict=True)), _MIN_SECONDS)

    def predict_matrix(self, x: np.ndarray) -> np.ndarray:
        """x: [S, len(FEATURES)] from ``feature_matrix`` -> [S] seconds."""
        return np.maximum(x @ self._coef, _MIN_SECONDS)

    @property
    def recent_relative_error(self) -> float:
        """Median |predicted - measured| / measured over recent steps, each predicted before
        it was seen (held out); NaN before any step."""
        return float(np.median(self._errors)) if self._errors else math.nan

    @property
    def num_observations(self) -> int:
        return min(self._num_observed, len(self._y))

    # ---- fitting ------------------------------------------------------------------------

    def add_profile(self, samples: Iterable[tuple[StepShape, float]]) -> None:
        """Start-up profile samples: kept in every fit (never slide out of the window)."""
        for shape, seconds in samples:
            if seconds > 0:
                self.profile.append((shape, seconds))
        if self.profile:
            self._anchor_x = shapes_matrix([shape for shape, _ in self.profile], profile=True)
            self._anchor_y = np.array([seconds for _, seconds in self.profile])
        self.fit()

    def observe(self, shape: StepShape, seconds: float) -> float:
        """Adds one measured step; returns what the model predicted for it beforehand."""
        x = feature_row(shape)
        predicted = self._predict_row(x)
        if seconds <= 0 or not math.isfinite(seconds):
            return predicted
        self._errors.append(abs(predicted - seconds) / seconds)
        if self.trace is not None:
            self.trace.append((shape, predicted, seconds))
        slot = self._num_observed % len(self._y)
        self._x[slot] = x
        self._y[slot] = seconds
        self._num_observed += 1
        self._since_fit += 1
        if self._since_fit >= self._refit_every:
            self.fit()
        return predicted

    def fit(self) -> None:
        self._since_fit = 0
        n = self.num_observations
        if len(self._anchor_y) + n < 4:
            return
        x = np.concatenate([self._anchor_x, self._x[:n]])
        y = np.concatenate([self._anchor_y, self._y[:n]])
        keep = np.ones(len(y), dtype=bool)
        coef = _weighted_ridge(x, y, keep)
        rel = (x @ coef - y) / y
        # Robust scale of the relative residuals (MAD), then one refit without outliers.
        sigma = 1.4826 * float(np.median(np.abs(rel - np.median(rel))))
        keep = np.abs(rel) <= max(_TRIM_SIGMAS * sigma, _TRIM_FLOOR)
        if keep.sum() >= 4 and not keep.all():
            coef = _weighted_ridge(x, y, keep)
        if np.all(np.isfinite(coef)):
            self._coef = coef
            self._coef_list = coef.tolist()
            self.num_fits += 1


def _weighted_ridge(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """argmin sum_i ((x_i c - y_i) / y_i)^2 + ridge * |D c|^2 over the kept rows, where D
    scales each feature to unit RMS (the intercept is not penalised)."""
    xw = x[keep] / y[keep, None]
    yw = np.ones(int(keep.sum()))
    scale = np.sqrt(np.mean(xw**2, axis=0))
    scale[scale == 0] = 1.0
    xs = xw / scale
    penalty = np.full(x.shape[1], _RIDGE * len(yw))
    few = [_INDEX[f"rows_over_{k}"] for k in _FEW_ROW_KNOTS]
    penalty[few] = _KNOT_RIDGE * len(yw)
    # A large knot's slope change is shrunk as if at least _KNOT_PSEUDO_STEPS steps past it
    # followed the slope below it: a ridge relative to the column's own data lets the few
    # steps past a knot (prefill bursts) set any slope beyond it, and that slope extrapolates.
    # The few-row knots keep the plain relative ridge: every decode batch lies past them.
    for k in _LARGE_ROW_KNOTS:
        column = _INDEX[f"rows_over_{k}"]
        past = int(np.count_nonzero(x[keep, column]))
        penalty[column] = max(_KNOT_RIDGE, _KNOT_PSEUDO_STEPS / max(past, 1)) * len(yw)
    penalty[_INDEX["intercept"]] = 0.0
    # Normal equations on the [F, F] Gram matrix (F ~ 30), which the ridge term keeps well
    # conditioned: 0.04 ms against 0.37 ms for an SVD least-squares solve of the [630, 29]
    # system, both cores busy (a whole refit over 600 steps: 0.47 ms median).
    gram = xs.T @ xs + np.diag(penalty)
    try:
        sol = np.linalg.solve(gram, xs.T @ yw)
    except np.linalg.LinAlgError:
        sol, *_ = np.linalg.lstsq(xs, yw, rcond=None)
    return sol / scale
