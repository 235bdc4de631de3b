"""The "true" step time of a simulated step, and the simulated start-up profile.

The true cost is what the simulated hardware takes; the policy never sees it. Cost-aware
policies get their own ``CostModel()`` that learns from the step times the simulator reports,
exactly as in the engine, seeded by ``startup_profile`` (the engine's profile grid, timed
with the true cost). Two kinds:

- ``coefficients``: a ``CostModel.from_coefficients`` over the engine's own features, e.g.
  fitted on a real server (exported on /metrics as
  ``specd:spec_decode_cost_model_coefficient{feature=...}``);
- ``smartspec``: the SmartSpec authors' vLLM fit for Llama-3-8B on an H100 (arXiv 2406.14066):
  T_target = 4.86e-5 N_kv + 1.84e-2 N_batched - 4.33e-2 B + 6.94 ms, plus 4% of T_target when
  a model-free drafter proposed for the whole batch (vLLM proposes for every request; a
  proposal for a share of the batch's speculating requests costs that share of the 4%) and
  5% when any drafts are verified (rejection sampling).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loadtest.prom import parse_text
from loadtest.sim.config import CostConfig, resolve_path
from server.engine.cost_profile import profile_grid
from server.engine.plan import StepPlan
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.speculation import plan_shape
from server.spec_decode.cost_model import FEATURES, CostModel, StepShape
from server.spec_decode.drafter import Drafter, DraftWork
from server.spec_decode.tree import TokenTree

# SmartSpec's fit (ms per unit): N_kv, N_batched, B, intercept.
SMARTSPEC_MS = {"kv": 4.86e-5, "batched": 1.84e-2, "requests": -4.33e-2, "intercept": 6.94}
# The engine's profile: decode requests at this context, each shape this many times
# (server/engine/cost_profile.py's _CONTEXT and _REPEATS).
PROFILE_CONTEXT = 64
PROFILE_REPEATS = 2
_COEF_METRIC = "spec_decode_cost_model_coefficient"


class TrueCost(Protocol):
    def seconds(self, shape: StepShape, proposed: float) -> float:
        """One step's time; ``proposed``: the share (0..1) of the step's requests that could
        speculate that a model-free drafter proposed for."""
        ...


@dataclass(frozen=True)
class SmartSpecCost:
    propose_fraction: float = 0.04
    verify_fraction: float = 0.05
    draft_forward_ms: float = 0.0
    draft_row_ms: float = 0.0

    def target_ms(self, shape: StepShape) -> float:
        c = SMARTSPEC_MS
        return (
            c["kv"] * shape.num_kv_tokens
            + c["batched"] * shape.num_tokens
            + c["requests"] * shape.num_requests
            + c["intercept"]
        )

    def seconds(self, shape: StepShape, proposed: float) -> float:
        target = self.target_ms(shape)
        ms = target * (
            1.0
            + self.propose_fraction * proposed
            + self.verify_fraction * (shape.num_spec_requests > 0)
        )
        ms += self.draft_forward_ms * shape.num_draft_forwards
        ms += self.draft_row_ms * shape.num_draft_rows
        return ms / 1e3


# Cost models fitted before rows were priced piecewise linear (commit ade69f1) had one
# indicator per exact row count, rows_eq_1..rows_eq_16; the reports of that time still replay.
_LEGACY_ROW_COUNT = re.compile(r"rows_eq_(\d+)$")


class CoefficientCost:
    """A fixed linear model over the engine's cost features (the profile indicator is 0)."""

    def __init__(self, coefficients: Mapping[str, float]) -> None:
        self.coefficients = {k: float(v) for k, v in coefficients.items() if k != "profile"}
        self._per_row_count: dict[int, float] = {}
        current = {}
        for name, value in self.coefficients.items():
            legacy = _LEGACY_ROW_COUNT.match(name)
            if legacy:
                self._per_row_count[int(legacy.group(1))] = value
            else:
                current[name] = value
        self._model = CostModel.from_coefficients(current)

    def seconds(self, shape: StepShape, proposed: float) -> float:
        return self._model.predict(shape) + self._per_row_count.get(shape.num_tokens, 0.0)


class NoisyCost:
    """``inner`` times a mean-preserving log-normal factor (seeded: runs stay reproducible)."""

    def __init__(self, inner: TrueCost, sigma: float, seed: int) -> None:
        self.inner = inner
        self.sigma = sigma
        self._rng = np.random.default_rng(seed)

    def seconds(self, shape: StepShape, proposed: float) -> float:
        factor = math.exp(self.sigma * self._rng.standard_normal() - self.sigma**2 / 2)
        return self.inner.seconds(shape, proposed) * factor


def make_cost(config: CostConfig, seed: int) -> TrueCost:
    cost: TrueCost
    if config.kind == "smartspec":
        cost = SmartSpecCost(
            config.propose_fraction,
            config.verify_fraction,
            config.draft_forward_ms,
            config.draft_row_ms,
        )
    else:
        coefs = dict(config.coefficients or {})
        if config.path:
            coefs = {**load_coefficients(resolve_path(config.path)), **coefs}
        cost = CoefficientCost(coefs)
    return NoisyCost(cost, config.noise, seed) if config.noise > 0 else cost


def load_coefficients(path: Path) -> dict[str, float]:
    """Seconds per feature from: a JSON ``{"coefficients": {...}}`` or a flat feature map, a
    sweep run JSON (the last ``metrics_timeline`` sample holding the coefficient gauges), or a
    Prometheus text scrape of /metrics."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _from_series(parse_text(text), path)
    if isinstance(data, dict) and isinstance(data.get("coefficients"), dict):
        return _features(data["coefficients"], path)
    if isinstance(data, dict) and data.get("metrics_timeline"):
        for row in reversed(data["metrics_timeline"]):
            if any(_COEF_METRIC in k for k in row):
                return _from_series(row, path)
        raise ValueError(f"{path}: no {_COEF_METRIC} series in its metrics_timeline")
    if isinstance(data, dict):
        return _features(data, path)
    raise ValueError(f"{path}: not a coefficients file")


def _from_series(series: Mapping[str, float], path: Path) -> dict[str, float]:
    out = {}
    for key, value in series.items():
        name, _, labels = key.partition("{")
        if name.endswith(_COEF_METRIC) and 'feature="' in labels:
            out[labels.split('feature="', 1)[1].split('"', 1)[0]] = float(value)
    if not out:
        raise ValueError(f"{path}: no {_COEF_METRIC} series")
    return _features(out, path)


def _features(d: Mapping[str, object], path: Path) -> dict[str, float]:
    unknown = sorted(k for k in set(d) - set(FEATURES) if not _LEGACY_ROW_COUNT.match(k))
    if unknown:
        raise ValueError(f"{path}: unknown cost features {unknown}")
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))}


def startup_profile(
    cost: TrueCost,
    drafter: Drafter,
    max_spec_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> list[tuple[StepShape, float]]:
    """(shape, seconds) samples of the engine's profile grid (``profile_grid``) built as
    ``server.engine.cost_profile`` builds them: decodes at context 64 with chains of k drafts,
    prefill chunks alone and with 4 decodes; model drafters propose for real (their work is in
    the shape), model-free ones do not (the engine's profile never proposes for them)."""
    samples = []
    model_drafter = not drafter.free_proposals
    for b, k, chunk in profile_grid(max_spec_tokens, max_num_seqs, max_num_batched_tokens):
        for _ in range(PROFILE_REPEATS):
            plan = _profile_plan(b, k, chunk)
            work = DraftWork()
            if model_drafter and k > 0:
                decoding = [r for r in plan.requests if r.request_id in plan.spec_trees]
                drafter.propose(decoding, [k] * len(decoding))
                work = drafter.last_work
            drafter.release([r.request_id for r in plan.requests])
            shape = plan_shape(plan, work)
            samples.append((shape, cost.seconds(shape, proposed=0.0)))
    return samples


def _profile_plan(num_decoding: int, drafts: int, chunk: int) -> StepPlan:
    params = SamplingParams(max_tokens=drafts + 2, temperature=0.0, ignore_eos=True)
    shapes = [(PROFILE_CONTEXT, 1, drafts)] * num_decoding + ([(chunk, chunk, 0)] if chunk else [])
    requests, num_tokens, trees = [], {}, {}
    for i, (length, n, k) in enumerate(shapes):
        r = Request(f"profile-{i}", [3] * length, params, frozenset(), 1 << 30)
        r.num_computed_tokens = length - n
        requests.append(r)
        num_tokens[r.request_id] = n
        if k > 0:
            trees[r.request_id] = TokenTree.chain(3, [3] * k)
    plan = StepPlan(requests, num_tokens)
    plan.spec_trees = trees
    plan.num_spec_tokens = {rid: t.num_drafts for rid, t in trees.items()}
    plan.spec_budgets = dict(plan.num_spec_tokens)
    return plan
