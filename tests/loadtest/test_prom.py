"""Prometheus text parsing and the speculative-decoding figures taken from deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.prom import Sampler, delta, metric_sum, parse_text, policy_summary, spec_summary

BEFORE = """\
# HELP specd:spec_decode_num_draft_tokens_total Draft tokens.
# TYPE specd:spec_decode_num_draft_tokens_total counter
specd:spec_decode_num_draft_tokens_total{model_name="m"} 100.0
specd:spec_decode_num_accepted_tokens_total{model_name="m"} 40.0
specd:spec_decode_num_drafts_total{model_name="m"} 25.0
specd:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 20
specd:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 12
specd:spec_budget_chosen{model_name="m"} 4
specd:e2e_request_latency_seconds_bucket{le="0.5",model_name="m"} 3
weird line that is not a sample
"""
AFTER = (
    BEFORE.replace("} 100.0", "} 300.0").replace("} 40.0", "} 160.0").replace("} 25.0", "} 75.0")
)


def test_parse_keys_and_labels() -> None:
    s = parse_text(BEFORE)
    assert s["specd:spec_decode_num_draft_tokens_total"] == 100.0
    assert s['specd:spec_decode_num_accepted_tokens_per_pos_total{position="1"}'] == 12
    assert s['specd:e2e_request_latency_seconds_bucket{le="0.5"}'] == 3
    assert len(s) == 7


def test_spec_summary_from_delta() -> None:
    d = delta(parse_text(BEFORE), parse_text(AFTER))
    out = spec_summary(d)
    assert out["draft_tokens"] == 200 and out["accepted_tokens"] == 120
    assert out["acceptance_rate"] == pytest.approx(0.6)
    assert out["mean_acceptance_length"] == pytest.approx(1 + 120 / 50)


def test_absent_metrics_give_nothing() -> None:
    s = parse_text('specd:num_requests_running{model_name="m"} 2\n')
    assert metric_sum(s, "spec_decode_num_draft_tokens_total") is None
    assert spec_summary(delta(s, s)) == {}


def test_vllm_prefix_counts_too() -> None:
    s = parse_text("vllm:spec_decode_num_draft_tokens_total 8\n")
    assert metric_sum(s, "spec_decode_num_draft_tokens_total") == 8


# specd's policy series as the engine exports them (server/metrics.py).
POLICY_BEFORE = """\
# TYPE specd:spec_decode_budget histogram
specd:spec_decode_budget_bucket{le="4.0",model_name="m"} 10
specd:spec_decode_budget_bucket{le="+Inf",model_name="m"} 20
specd:spec_decode_budget_sum{model_name="m"} 60
specd:spec_decode_budget_count{model_name="m"} 20
specd:spec_decode_policy_steps_total{model_name="m"} 10
specd:spec_decode_predicted_step_seconds_total{model_name="m"} 0.5
specd:spec_decode_measured_step_seconds_total{model_name="m"} 0.6
specd:spec_decode_estimated_goodput_tokens_per_second{model_name="m"} 80
"""
POLICY_AFTER = """\
specd:spec_decode_budget_bucket{le="4.0",model_name="m"} 12
specd:spec_decode_budget_bucket{le="+Inf",model_name="m"} 30
specd:spec_decode_budget_sum{model_name="m"} 110
specd:spec_decode_budget_count{model_name="m"} 30
specd:spec_decode_policy_steps_total{model_name="m"} 14
specd:spec_decode_predicted_step_seconds_total{model_name="m"} 0.7
specd:spec_decode_measured_step_seconds_total{model_name="m"} 0.84
specd:spec_decode_estimated_goodput_tokens_per_second{model_name="m"} 95
"""


def test_policy_summary_from_delta() -> None:
    out = policy_summary(delta(parse_text(POLICY_BEFORE), parse_text(POLICY_AFTER)))
    assert out["budget_mean"] == pytest.approx(50 / 10)  # delta sum / delta count
    assert out["predicted_step_ms"] == pytest.approx(1000 * 0.2 / 4)
    assert out["measured_step_ms"] == pytest.approx(1000 * 0.24 / 4)


def test_policy_summary_needs_steps_and_observations() -> None:
    same = parse_text(POLICY_BEFORE)
    assert policy_summary(delta(same, same)) == {}  # no step in the interval: no means
    assert policy_summary(parse_text(BEFORE)) == {}  # a server without the policy series


def test_timeline_rows() -> None:
    sampler = Sampler("http://unused")
    sampler.samples = [
        (0.0, parse_text(BEFORE + POLICY_BEFORE)),
        (1.0, parse_text(AFTER + POLICY_AFTER)),
    ]
    (row,) = sampler.timeline()
    assert row["t"] == 1.0
    assert row["acceptance_rate"] == pytest.approx(0.6)
    assert row["budget_mean"] == pytest.approx(5.0)
    assert row["predicted_step_ms"] == pytest.approx(50.0)
    assert row["measured_step_ms"] == pytest.approx(60.0)
    assert row["estimated_goodput_tok_s"] == 95  # a gauge: its value at the interval's end


def test_timeline_without_policy_series() -> None:
    sampler = Sampler("http://unused")
    sampler.samples = [(0.0, parse_text(BEFORE)), (1.0, parse_text(AFTER))]
    (row,) = sampler.timeline()
    assert set(row) == {"t", "accepted_tokens", "draft_tokens", "acceptance_rate", "drafts",
                        "mean_acceptance_length"}  # fmt: skip


def test_the_last_timeline_row_holds_the_cost_model_as_fitted_at_the_runs_end(
    tmp_path: Path,
) -> None:
    """Absolute coefficient values on the last row only; ``loadtest.simulate --cost-path``
    reads them back from a run JSON."""
    from loadtest.sim.cost import load_coefficients

    def coefficients(rows: float) -> str:
        return (
            f'\nspecd:spec_decode_cost_model_coefficient{{feature="rows",model_name="m"}} {rows}\n'
            'specd:spec_decode_cost_model_coefficient{feature="intercept",model_name="m"} 0.03\n'
        )

    sampler = Sampler("http://unused")
    sampler.samples = [
        (0.0, parse_text(BEFORE + POLICY_BEFORE + coefficients(0.001))),
        (1.0, parse_text(AFTER + POLICY_AFTER + coefficients(0.002))),
        (2.0, parse_text(AFTER + POLICY_AFTER + coefficients(0.004))),
    ]
    first, last = sampler.timeline()
    assert not any("coefficient" in k for k in first)
    (tmp_path / "run.json").write_text(json.dumps({"metrics_timeline": [first, last]}))
    assert load_coefficients(tmp_path / "run.json") == {"rows": 0.004, "intercept": 0.03}
