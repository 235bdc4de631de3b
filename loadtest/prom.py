"""Prometheus text exposition: parse, scrape /metrics, take deltas, sample in the background.

Only the speculative-decoding series matter to a report: acceptance = accepted / draft tokens,
and specd's speculation-policy series (chosen budget, predicted and measured step time,
estimated goodput). Peers export the acceptance counters under `vllm:` (vLLM) and `llamacpp:`
(llama-server started with --metrics); every prefix counts. The policy series are specd's own:
a server without them simply contributes no policy figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field

import httpx

# name{labels} value [timestamp]; label values may hold escaped quotes.
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

PREFIXES = ("specd:", "vllm:", "llamacpp:")
ACCEPTED = "spec_decode_num_accepted_tokens_total"
DRAFTED = "spec_decode_num_draft_tokens_total"
DRAFTS = "spec_decode_num_drafts_total"
# specd's policy series (server/metrics.py), names without the prefix:
# a histogram of the per-request budget chosen each step (_sum / _count)...
BUDGET = "spec_decode_budget"
# ...counters of policy steps and of the step time the policy predicted / the engine measured...
POLICY_STEPS = "spec_decode_policy_steps_total"
PREDICTED_STEP_S = "spec_decode_predicted_step_seconds_total"
MEASURED_STEP_S = "spec_decode_measured_step_seconds_total"
# ...and a gauge of the goodput the policy expects from its last choice.
ESTIMATED_GOODPUT = "spec_decode_estimated_goodput_tokens_per_second"
# ...and the cost model's fitted coefficients (gauges, one series per feature).
COEFFICIENT = "spec_decode_cost_model_coefficient"
# Any series whose name holds one of these is kept in the time series.
KEEP = ("spec_decode", "num_requests_running", "generation_tokens")

Series = dict[str, float]  # "name{a=\"b\"}" -> value


def parse_text(text: str) -> Series:
    """Every sample in an exposition, keyed by name plus its labels in sorted order."""
    out: Series = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        key = name
        if labels:
            pairs = sorted(_LABEL.findall(labels))
            # Drop model_name-style labels that are the same on every series of one server.
            pairs = [(k, val) for k, val in pairs if k not in ("model_name", "engine")]
            if pairs:
                key += "{" + ",".join(f'{k}="{val}"' for k, val in pairs) + "}"
        out[key] = out.get(key, 0.0) + v
    return out


def metric_sum(series: Series, suffix: str) -> float | None:
    """Sum of every series named <prefix><suffix> (all label sets), or None when absent."""
    vals = [v for k, v in series.items() if any(k.split("{")[0] == p + suffix for p in PREFIXES)]
    return sum(vals) if vals else None


def delta(before: Series, after: Series) -> Series:
    """after - before for every key present in `after` (counters; gauges give the change)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def spec_summary(d: Series) -> dict[str, float]:
    """Acceptance figures from a delta, vLLM's definitions; empty when the server has none."""
    acc, drafted, drafts = (metric_sum(d, s) for s in (ACCEPTED, DRAFTED, DRAFTS))
    out: dict[str, float] = {}
    if acc is not None:
        out["accepted_tokens"] = acc
    if drafted is not None:
        out["draft_tokens"] = drafted
        if acc is not None and drafted > 0:
            out["acceptance_rate"] = acc / drafted
    if drafts is not None:
        out["drafts"] = drafts
        if acc is not None and drafts > 0:
            out["mean_acceptance_length"] = 1 + acc / drafts
    return out


def policy_summary(d: Series) -> dict[str, float]:
    """Means over a delta's interval: the chosen per-request budget (delta sum / delta count)
    and the predicted and measured step time in ms (delta seconds / delta policy steps).
    Empty when the server exports no policy series or the policy ran no step."""
    out: dict[str, float] = {}
    total, count = metric_sum(d, BUDGET + "_sum"), metric_sum(d, BUDGET + "_count")
    if total is not None and count:
        out["budget_mean"] = total / count
    steps = metric_sum(d, POLICY_STEPS)
    if steps:
        for key, name in (
            ("predicted_step_ms", PREDICTED_STEP_S),
            ("measured_step_ms", MEASURED_STEP_S),
        ):
            seconds = metric_sum(d, name)
            if seconds is not None:
                out[key] = 1000.0 * seconds / steps
    return out


async def scrape(client: httpx.AsyncClient, base_url: str) -> Series | None:
    """GET <base_url>/metrics, or None when the server has no (reachable) metrics."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_text(resp.text)


@dataclass
class Sampler:
    """Scrapes /metrics every `interval_s` while a run goes, keeping the KEEP series."""

    base_url: str
    interval_s: float = 1.0
    samples: list[tuple[float, Series]] = field(default_factory=list)

    async def run(self, client: httpx.AsyncClient, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            series = await scrape(client, self.base_url)
            if series is None:
                return  # no metrics endpoint: nothing to sample
            kept = {k: v for k, v in series.items() if any(s in k for s in KEEP)}
            self.samples.append((time.perf_counter() - t0, kept))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)

    def timeline(self) -> list[dict[str, float]]:
        """Per interval (t = seconds since the run's start, at the interval's end): acceptance
        and policy means from the interval's deltas, the estimated-goodput gauge's value at
        its end; each only when the server exports it. The last row also holds the cost
        model's coefficient gauges at the run's end."""
        rows = []
        for (_t_a, a), (t_b, b) in zip(self.samples, self.samples[1:], strict=False):
            d = delta(a, b)
            row: dict[str, float] = {"t": t_b}
            row.update(spec_summary(d))
            row.update(policy_summary(d))
            goodput = metric_sum(b, ESTIMATED_GOODPUT)
            if goodput is not None:
                row["estimated_goodput_tok_s"] = goodput
            rows.append(row)
        if rows:
            # The cost model as fitted at the run's end, as absolute values (a run's
            # metrics_delta holds only their change): what `loadtest.simulate --cost-path
            # <run JSON>` replays. On the last row alone, to keep run JSONs small.
            last = self.samples[-1][1]
            rows[-1].update({k: v for k, v in last.items() if COEFFICIENT in k})
        return rows
