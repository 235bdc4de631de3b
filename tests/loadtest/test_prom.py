"""Prometheus text parsing and the speculative-decoding figures taken from deltas."""

from __future__ import annotations

import pytest

from loadtest.prom import Sampler, delta, metric_sum, parse_text, spec_summary

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


def test_timeline_rows() -> None:
    sampler = Sampler("http://unused")
    sampler.samples = [(0.0, parse_text(BEFORE)), (1.0, parse_text(AFTER))]
    (row,) = sampler.timeline()
    assert row["t"] == 1.0
    assert row["acceptance_rate"] == pytest.approx(0.6)
    assert row["specd:spec_budget_chosen"] == 4
