"""A run's summary, computed as `vllm bench serve` computes it (benchmarks/serve.py,
calculate_metrics), and the result JSON with its keys.

Per successful request: TTFT, TPOT = (E2EL - TTFT) / (output_len - 1) (0 when output_len <= 1),
every ITL gap, E2EL. Goodput counts requests meeting every given SLO (in ms): TTFT and E2EL
against their own values, TPOT against the request's TPOT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.records import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {SLO_METRICS}, got {item!r}")
        try:
            slos[key] = float(value)
        except ValueError as e:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from e
        if slos[key] < 0:
            raise ValueError(f"--goodput {item!r}: must be >= 0 ms")
    return slos


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


@dataclass
class Summary:
    duration: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    # metric -> {"mean": ms, "median": ms, "std": ms, "p99": ms, ...}
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0


def _stats(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    # vLLM reports 0 for an empty list (np.mean(x or 0)); keep that so keys are always numbers.
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[percentile_key(p)] = float(np.percentile(arr, p))
    return out


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": rec.ttft * 1000, "tpot": rec.tpot * 1000, "e2el": rec.latency * 1000}
    return rec.success and all(values_ms[k] <= v for k, v in slos.items())


def _peaks(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """Peak output tokens/s over 1 s buckets (tokens spread evenly over each request's decode
    span) and the peak number of requests in flight at once."""
    ok = [r for r in records if r.success]
    if not ok:
        return 0.0, 0
    end = max(r.start_time + r.latency for r in ok)
    buckets = np.zeros(math.ceil(end) + 1)
    for r in ok:
        first = r.start_time + r.ttft
        last = r.start_time + r.latency
        if r.output_len <= 0:
            continue
        times = np.linspace(first, last, r.output_len) if r.output_len > 1 else np.array([first])
        np.add.at(buckets, times.astype(int), 1)
    events = sorted(
        [(r.start_time, 1) for r in records]
        + [(r.start_time + max(r.latency, r.ttft), -1) for r in records]
    )
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return float(buckets.max()), peak


def summarize(
    records: Sequence[RequestRecord],
    duration: float,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = (99,),
    metrics: Sequence[str] = METRICS,
) -> Summary:
    ok = [r for r in records if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok]
    itls = [g for r in ok for g in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    dur = max(duration, 1e-9)
    goodput = None
    if slos:
        goodput = sum(meets_slos(r, slos) for r in ok) / dur
    values = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    peak_tps, peak_conc = _peaks(records)
    return Summary(
        duration=duration,
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        request_goodput=goodput,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        stats={m: _stats(values[m], percentiles) for m in metrics},
        max_output_tokens_per_s=peak_tps,
        max_concurrent_requests=peak_conc,
    )


def result_json(
    summary: Summary, records: Sequence[RequestRecord], header: dict[str, Any]
) -> dict[str, Any]:
    """`vllm bench serve --save-result`'s dict: header (date, backend, model_id, ...), the
    summary, per-metric mean/median/std/pNN in ms, per-request lists, then our own detail."""
    ok_or_all = list(records)
    out: dict[str, Any] = dict(header)
    out.update(
        duration=summary.duration,
        completed=summary.completed,
        failed=summary.failed,
        total_input_tokens=summary.total_input_tokens,
        total_output_tokens=summary.total_output_tokens,
        request_throughput=summary.request_throughput,
        request_goodput=summary.request_goodput,
        output_throughput=summary.output_throughput,
        total_token_throughput=summary.total_token_throughput,
        max_output_tokens_per_s=summary.max_output_tokens_per_s,
        max_concurrent_requests=summary.max_concurrent_requests,
    )
    # vLLM's per-request lists hold an entry for every request, failures included.
    out["input_lens"] = [r.prompt_len for r in ok_or_all]
    out["output_lens"] = [r.output_len if r.success else 0 for r in ok_or_all]
    out["ttfts"] = [r.ttft for r in ok_or_all]
    out["itls"] = [r.itl for r in ok_or_all]
    out["generated_texts"] = [r.generated_text for r in ok_or_all]
    out["errors"] = [r.error for r in ok_or_all]
    for metric, st in summary.stats.items():
        for name, value in st.items():
            out[f"{name}_{metric}_ms"] = value
    out["requests"] = [r.to_dict() for r in ok_or_all]
    return out


def format_summary(summary: Summary, title: str = "Serving Benchmark Result") -> str:
    """The console table, laid out as vLLM prints it."""
    names = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40}{value:<20{fmt}}")

    row("Successful requests:", summary.completed)
    row("Failed requests:", summary.failed)
    row("Benchmark duration (s):", summary.duration, ".2f")
    row("Total input tokens:", summary.total_input_tokens)
    row("Total generated tokens:", summary.total_output_tokens)
    row("Request throughput (req/s):", summary.request_throughput, ".2f")
    if summary.request_goodput is not None:
        row("Request goodput (req/s):", summary.request_goodput, ".2f")
    row("Output token throughput (tok/s):", summary.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", summary.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", summary.max_concurrent_requests)
    row("Total Token throughput (tok/s):", summary.total_token_throughput, ".2f")
    for metric, st in summary.stats.items():
        lines.append(f"{' ' + names[metric] + ' ':-^60}")
        for name, value in st.items():
            label = {"mean": "Mean", "median": "Median", "std": "Std"}.get(name, name.upper())
            if name == "std":
                continue
            row(f"{label} {metric.upper()} (ms):", value, ".2f")
    lines.append("=" * 60)
    return "\n".join(lines)
