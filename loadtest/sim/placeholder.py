"""PLACEHOLDER step-cost coefficients for SmolLM2-135M on this 2-core CPU, until a real run's
are exported: ``python -m loadtest.sim.placeholder [--out PATH]``.

The real ``CostModel`` is fitted on SYNTHETIC, CPU-like step times: the few-row linear
timings of loadtest/results/engine/linear-cpu.md (1 row 45 ms, 4 rows 17 ms, 256 rows 428 ms,
interpolated), plus rough guesses for the LM head, attention, per-request and verification
costs. Replace the file with the coefficients of a real server: scrape /metrics
(``specd:spec_decode_cost_model_coefficient{feature=...}``) after a run with the goodput
policy, or point ``cost.path`` at that scrape or at a sweep run JSON (its metrics_timeline
holds the same gauges).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from loadtest.bench import write_json
from server.engine.cost_profile import profile_grid
from server.spec_decode.cost_model import CostModel, StepShape

DEFAULT_OUT = "loadtest/results/sim/smollm2-cpu-coefficients.json"
# rows -> ms of one forward's linears (specd's linear, linear-cpu.md).
_LINEAR_MS = {1: 45.2, 2: 31.7, 3: 48.0, 4: 16.8, 5: 24.5, 8: 31.2, 16: 37.2, 64: 121.0}
_LINEAR_MS |= {65: 147.5, 256: 427.5, 1024: 1318.9}
# Guesses (ms): the 49152 x 576 LM head, attention per context token over 30 layers, per
# request (gather, sampling), per verifying request and per step that verifies, scheduling.
_HEAD_MS, _HEAD_PER_ROW_MS = 3.0, 0.35
_KV_MS = 0.004
_REQUEST_MS, _SPEC_REQUEST_MS, _VERIFY_MS, _STEP_MS = 0.25, 0.3, 1.5, 3.0


def synthetic_seconds(shape: StepShape) -> float:
    """A CPU-like step time (no noise)."""
    xs = sorted(_LINEAR_MS)
    linear = float(np.interp(shape.num_tokens, xs, [_LINEAR_MS[x] for x in xs]))
    if shape.num_tokens > xs[-1]:  # beyond the table: its last slope
        linear += (shape.num_tokens - xs[-1]) * (_LINEAR_MS[1024] - _LINEAR_MS[256]) / 768
    ms = (
        _STEP_MS
        + linear
        + _HEAD_MS
        + _HEAD_PER_ROW_MS * max(shape.num_logit_rows - 1, 0)
        + _KV_MS * shape.num_kv_tokens
        + _REQUEST_MS * shape.num_requests
        + _SPEC_REQUEST_MS * shape.num_spec_requests
        + _VERIFY_MS * (shape.num_spec_requests > 0)
    )
    return ms / 1e3


def synthetic_steps(rng: np.random.Generator, n: int) -> list[StepShape]:
    """Serving-like steps: 1..64 decoding requests at contexts 100..600 with 0..8 drafts
    each, a prefill chunk in a third of them (the rest of a 1024-token budget at most)."""
    shapes = []
    for _ in range(n):
        b = int(rng.integers(1, 65))
        drafts = rng.integers(0, 9, size=b) * (rng.random() < 0.7)
        context = rng.integers(100, 600, size=b)
        chunk = int(rng.integers(16, 1024 - b * 9 + 1)) if rng.random() < 0.33 else 0
        spec = int((drafts > 0).sum())
        shapes.append(
            StepShape(
                num_tokens=b + int(drafts.sum()) + chunk,
                num_logit_rows=b + int(drafts.sum()) + (1 if chunk else 0),
                num_kv_tokens=int(context.sum() + drafts.sum()) + chunk,
                num_requests=b + (1 if chunk else 0),
                num_spec_requests=spec,
            )
        )
    return shapes


def profile_shapes(max_spec_tokens: int = 8) -> list[StepShape]:
    """The engine's profile grid at context 64 (server/engine/cost_profile.py)."""
    shapes = []
    for b, k, chunk in profile_grid(max_spec_tokens, 64, 1024):
        shapes.append(
            StepShape(
                num_tokens=b * (1 + k) + chunk,
                num_logit_rows=b * (1 + k) + (1 if chunk else 0),
                num_kv_tokens=b * (64 + k) + chunk,
                num_requests=b + (1 if chunk else 0),
                num_spec_requests=b if k else 0,
            )
        )
    return shapes


def fit(seed: int = 0, noise: float = 0.05) -> tuple[dict[str, float], float]:
    """(coefficients, median relative error on fresh synthetic steps)."""
    rng = np.random.default_rng(seed)

    def timed(shape: StepShape) -> float:
        return synthetic_seconds(shape) * float(np.exp(noise * rng.standard_normal()))

    model = CostModel(window=2048)
    model.add_profile([(s, timed(s)) for s in profile_shapes() for _ in range(2)])
    for shape in synthetic_steps(rng, 2000):
        model.observe(shape, timed(shape))
    model.fit()
    coefficients = {k: v for k, v in model.coefficients.items() if k != "profile"}
    held_out = synthetic_steps(rng, 500)
    errors = [abs(model.predict(s) - synthetic_seconds(s)) / synthetic_seconds(s) for s in held_out]
    return coefficients, float(np.median(errors))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sim.placeholder", description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    coefficients, error = fit()
    write_json(
        Path(args.out),
        {
            "placeholder": True,
            "note": (
                "PLACEHOLDER: CostModel fitted on SYNTHETIC CPU-like step times "
                "(python -m loadtest.sim.placeholder), not measured. Replace with the "
                "specd:spec_decode_cost_model_coefficient gauges of a real SmolLM2 run."
            ),
            "model": "smollm2-135m-instruct (synthetic)",
            "units": "seconds per unit of each feature (server.spec_decode.cost_model)",
            "synthetic_fit_median_relative_error": error,
            "coefficients": coefficients,
        },
    )
    print(f"wrote {args.out} (median relative error on synthetic steps {100 * error:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
