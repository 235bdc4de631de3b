"""Prometheus metrics, named as vLLM's under the `specd:` prefix.

Engine-side numbers are read from the latest ``SchedulerStats`` snapshot at scrape time by a
custom collector, so the engine loop never pays for metrics bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.engine.request_timing import RequestTiming
from server.engine.scheduler import SchedulerStats
from server.engine.speculation import SpeculationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineStatsCollector(Collector):
    def __init__(self, model_name: str, read_stats: Callable[[], SchedulerStats]) -> None:
        self._model_name = model_name
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        s = self._read_stats()
        labels = ["model_name"]
        value = [self._model_name]
        gauges = [
            ("specd:num_requests_running", "Requests in the running batch.", s.num_running),
            ("specd:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (
                "specd:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0-1).",
                s.kv_cache_usage,
            ),
            ("specd:num_kv_blocks_used", "KV-cache blocks in use.", s.num_blocks_used),
            ("specd:num_kv_blocks_total", "KV-cache blocks allocated.", s.num_blocks_total),
        ]
        for name, doc, v in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, float(v))
            yield g
        counters = [
            (
                "specd:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (
                "specd:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
            ),
            ("specd:num_preemptions", "Requests preempted (by recompute).", s.num_preemptions),
            (
                "specd:prompt_tokens",
                "Prompt tokens computed (prefix-cache hits excluded).",
                s.num_prompt_tokens_computed,
            ),
            ("specd:generation_tokens", "Tokens generated.", s.num_generated_tokens),
            ("specd:engine_steps", "Engine steps run.", s.num_steps),
            (
                "specd:spec_decode_num_drafts",
                "Verify steps that carried draft tokens.",
                s.num_drafts,
            ),
            ("specd:spec_decode_num_draft_tokens", "Draft tokens proposed.", s.num_draft_tokens),
            (
                "specd:spec_decode_num_accepted_tokens",
                "Draft tokens accepted.",
                s.num_accepted_tokens,
            ),
        ]
        for name, doc, v in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, float(v))
            yield c
        per_position = CounterMetricFamily(
            "specd:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0 = first).",
            labels=[*labels, "position"],
        )
        for position, accepted in enumerate(s.accepted_per_position):
            per_position.add_metric([*value, str(position)], float(accepted))
        yield per_position
        if s.speculation is not None:
            yield from _policy_metrics(s.speculation, labels, value)


def _policy_metrics(
    spec: SpeculationStats, labels: list[str], value: list[str]
) -> Iterator[Metric]:
    """The speculation policy's own: chosen budgets, its step-time predictions, its goodput."""
    p = spec.policy
    info = InfoMetricFamily(
        "specd:spec_decode_policy", "The active speculation policy.", labels=labels
    )
    info.add_metric(value, {"policy": p.name})
    yield info
    # Cumulative buckets le=0, 1, ..., k: requests given at most that many draft tokens.
    budget = HistogramMetricFamily(
        "specd:spec_decode_budget",
        "Draft tokens verified per decoding request per step (0 = plain decode), over "
        "requests that could speculate.",
        labels=labels,
    )
    cumulative, buckets = 0, []
    for b, count in enumerate(spec.budget_counts):
        cumulative += count
        buckets.append((str(b), float(cumulative)))
    buckets.append(("+Inf", float(cumulative)))
    budget.add_metric(value, buckets, float(spec.budget_sum))
    yield budget
    counters = [
        (
            "specd:spec_decode_policy_steps",
            "Steps whose time the policy's cost model predicted before they ran.",
            p.num_predicted_steps,
        ),
        (
            "specd:spec_decode_predicted_step_seconds",
            "Predicted step time, summed over those steps.",
            p.predicted_seconds_total,
        ),
        (
            "specd:spec_decode_measured_step_seconds",
            "Measured step time (schedule to update), summed over those steps.",
            p.measured_seconds_total,
        ),
    ]
    for name, doc, v in counters:
        c = CounterMetricFamily(name, doc, labels=labels)
        c.add_metric(value, float(v))
        yield c
    gauges = [
        (
            "specd:spec_decode_estimated_goodput_tokens_per_second",
            "Expected emitted tokens per second of the policy's last allocation.",
            p.estimated_goodput,
        ),
        (
            "specd:spec_decode_cost_model_relative_error",
            "Median relative error of the cost model's recent held-out step-time predictions.",
            p.cost_model_relative_error,
        ),
    ]
    for name, doc, v in gauges:
        g = GaugeMetricFamily(name, doc, labels=labels)
        g.add_metric(value, float(v))
        yield g
    coef = GaugeMetricFamily(
        "specd:spec_decode_cost_model_coefficient",
        "The step-time cost model's fitted coefficients (seconds per unit of each feature).",
        labels=[*labels, "feature"],
    )
    for feature, c in p.cost_model_coefficients.items():
        coef.add_metric([*value, feature], c)
    yield coef
    acceptance = GaugeMetricFamily(
        "specd:spec_decode_estimated_acceptance",
        "The policy's global estimate of P(draft accepted | parent accepted), by position.",
        labels=[*labels, "position"],
    )
    for position, prob in enumerate(p.acceptance_by_depth):
        acceptance.add_metric([*value, str(position)], prob)
    yield acceptance
    for name, doc, index in (
        (
            "specd:spec_decode_drafter_memory_bytes",
            "Memory held by the drafter's learned state (suffix cache, recycle tables).",
            0,
        ),
        (
            "specd:spec_decode_drafter_memory_limit_bytes",
            "The most that state may hold (suffix_cache_mb; recycle tables are fixed-size).",
            1,
        ),
    ):
        g = GaugeMetricFamily(name, doc, labels=[*labels, "part"])
        for part, sizes in spec.drafter_memory.items():
            g.add_metric([*value, part], float(sizes[index]))
        yield g


def build_registry(model_name: str, read_stats: Callable[[], SchedulerStats]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(model_name, read_stats))
    return registry


# Why a request was refused before it reached the engine (the `reason` label).
REJECTION_REASONS = (
    "queue_requests",  # 503: the waiting queue holds max_num_queued_reqs requests
    "queue_tokens",  # 503: ... or max_num_queued_tokens prompt tokens
    "body_too_large",  # 413
    "request_limit",  # 400: n, logprobs, stop strings or logit_bias beyond their limits
    "invalid_request",  # 400/404/422: any other bad input
    "engine_unavailable",  # 503: the engine process is not running
    "draining",  # 503: the server is draining before it stops (SIGTERM)
)


class RejectionCounter:
    """specd:requests_rejected_total{reason}: the API process counts these itself."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self._counter = Counter(
            "specd:requests_rejected",
            "Requests refused before reaching the engine, by reason.",
            ["model_name", "reason"],
            registry=registry,
        )
        self._model_name = model_name
        for reason in REJECTION_REASONS:  # every series exists from the start, at 0
            self._counter.labels(model_name, reason)

    def inc(self, reason: str) -> None:
        self._counter.labels(self._model_name, reason).inc()


def register_admission_gauges(
    registry: CollectorRegistry,
    model_name: str,
    queued_requests: Callable[[], float],
    queued_tokens: Callable[[], float],
) -> None:
    """The admission queue (server/api/admission.py), read at scrape time."""
    for name, doc, read in (
        (
            "specd:admission_queued_requests",
            "Requests admitted that have not produced a first token (the bounded queue).",
            queued_requests,
        ),
        (
            "specd:admission_queued_tokens",
            "Prompt tokens of those requests.",
            queued_tokens,
        ),
    ):
        gauge = Gauge(name, doc, ["model_name"], registry=registry)
        gauge.labels(model_name).set_function(read)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read ours alike.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                  60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISHED_REASONS = ("stop", "length", "abort")


def _one_two_five(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


class RequestMetrics:
    """Per-request histograms and the success counter, observed in the API process from each
    request's timeline (server/engine/request_timing.py). Latency histograms count requests
    that finished ("stop", "length"); aborted ones (client gone, engine error, timeout) count
    only in request_success_total{finished_reason="abort"}."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry).labels(
                model_name
            )

        self._ttft = histogram(
            "specd:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self._itl = histogram(
            "specd:inter_token_latency_seconds",
            "Time between consecutive outputs of a request (one per engine step that emitted "
            "tokens: a verify step's accepted drafts arrive together).",
            _ITL_BUCKETS,
        )
        self._e2e = histogram(
            "specd:e2e_request_latency_seconds", "Arrival to last token.", _PHASE_BUCKETS
        )
        self._queue = histogram(
            "specd:request_queue_time_seconds", "Arrival to first scheduled.", _PHASE_BUCKETS
        )
        self._prefill = histogram(
            "specd:request_prefill_time_seconds",
            "First scheduled to first token.",
            _PHASE_BUCKETS,
        )
        self._decode = histogram(
            "specd:request_decode_time_seconds", "First token to last token.", _PHASE_BUCKETS
        )
        token_buckets = _one_two_five(max_model_len)
        self._prompt_tokens = histogram(
            "specd:request_prompt_tokens", "Prompt tokens per request.", token_buckets
        )
        self._generation_tokens = histogram(
            "specd:request_generation_tokens", "Generated tokens per request.", token_buckets
        )
        self._success = Counter(
            "specd:request_success",
            "Requests finished, by why (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self._model_name = model_name
        for reason in FINISHED_REASONS:
            self._success.labels(model_name, reason)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, timing: RequestTiming) -> None:
        reason = timing.finish_reason or "abort"
        self._success.labels(self._model_name, reason).inc()
        if reason == "abort":
            return
        for histogram, value in (
            (self._ttft, timing.ttft_s),
            (self._e2e, timing.e2e_s),
            (self._queue, timing.queue_s),
            (self._prefill, timing.prefill_s),
            (self._decode, timing.decode_s),
        ):
            if value is not None:
                histogram.observe(max(value, 0.0))
        self._prompt_tokens.observe(timing.num_prompt_tokens)
        self._generation_tokens.observe(timing.num_generation_tokens)
