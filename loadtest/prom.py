"""Prometheus text exposition: parse, scrape /metrics, take deltas, sample in the background.

Only the speculative-decoding series matter to a report: acceptance = accepted / draft tokens,
and the policy's chosen budget. Peers export the same counters under `vllm:` (vLLM) and
`llamacpp:` (llama-server started with --metrics); every prefix counts.
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
# Any series whose name holds one of these is kept in the time series (budget gauges and
# histograms are the policy's own: names are not fixed by vLLM).
KEEP = ("spec_decode", "budget", "goodput", "num_requests_running", "generation_tokens")

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
        """Per interval: time, acceptance rate and budget (when exported), from deltas."""
        rows = []
        for (_t_a, a), (t_b, b) in zip(self.samples, self.samples[1:], strict=False):
            d = delta(a, b)
            row: dict[str, float] = {"t": t_b}
            row.update(spec_summary(d))
            for k, v in b.items():
                if "budget" in k and not k.endswith(("_bucket", "_count", "_sum", "_created")):
                    row[k] = v  # a gauge: its current value
            for k in b:
                if "budget" in k and k.split("{")[0].endswith("_sum"):
                    count_key = k.replace("_sum", "_count", 1)
                    if d.get(count_key, 0) > 0:
                        row[k.replace("_sum", "_mean", 1)] = d[k] / d[count_key]
            rows.append(row)
        return rows
