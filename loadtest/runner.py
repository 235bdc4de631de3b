"""One bounded benchmark run: send samples at their arrival times, under an optional
concurrency cap, stop sending at the duration cap, and collect one RequestRecord each."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.asyncio import tqdm

from loadtest import prom
from loadtest.arrivals import send_times
from loadtest.client import ApiConfig, send_request
from loadtest.records import RequestRecord, Sample


@dataclass(frozen=True)
class RunConfig:
    api: ApiConfig
    request_rate: float = math.inf
    burstiness: float = 1.0
    # None: open loop. With request_rate=inf this is a closed loop of N concurrent users.
    max_concurrency: int | None = None
    # No request is sent after duration_s; those in flight get drain_timeout_s more, then are
    # abandoned and counted as failed. None: no cap (the count bounds the run).
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    seed: int = 0
    progress: bool = True
    metrics_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"--duration must be > 0 s, got {self.duration_s}")


@dataclass
class RunOutput:
    records: list[RequestRecord]
    duration: float
    not_sent: int = 0
    # /metrics after - before (None: the server exports none); acceptance and policy figures
    # (mean budget, predicted / measured step time) from it.
    metrics_delta: prom.Series | None = None
    spec: dict[str, float] = field(default_factory=dict)
    timeline: list[dict[str, float]] = field(default_factory=list)

    def extra_json(self) -> dict[str, Any]:
        return {
            "not_sent": self.not_sent,
            "spec_decode": self.spec,
            "metrics_delta": self.metrics_delta,
            "metrics_timeline": self.timeline,
        }


async def run_benchmark(cfg: RunConfig, samples: list[Sample]) -> RunOutput:
    times = send_times(len(samples), cfg.request_rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.api.request_timeout_s, connect=10.0, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        before = await prom.scrape(client, cfg.api.base_url)
        sampler = prom.Sampler(cfg.api.base_url, cfg.metrics_interval_s)
        stop = asyncio.Event()
        pbar = tqdm(total=len(samples), disable=not cfg.progress, desc="requests")
        t0 = time.perf_counter()
        last_done = t0
        sampler_task = asyncio.create_task(sampler.run(client, t0, stop)) if before else None
        started: dict[int, float] = {}  # index -> send offset, for abandoned requests

        async def one(i: int, sample: Sample) -> RequestRecord | None:
            nonlocal last_done
            await asyncio.sleep(max(0.0, t0 + times[i] - time.perf_counter()))
            if sem is not None:
                await sem.acquire()
            try:
                if cfg.duration_s is not None and time.perf_counter() - t0 >= cfg.duration_s:
                    return None
                started[i] = time.perf_counter() - t0
                rec = await send_request(client, cfg.api, sample, i, t0)
            finally:
                if sem is not None:
                    sem.release()
            last_done = max(last_done, time.perf_counter())
            pbar.update(1)
            return rec

        tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(samples)]
        hard = None if cfg.duration_s is None else cfg.duration_s + cfg.drain_timeout_s
        _done, pending = await asyncio.wait(tasks, timeout=hard)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        pbar.close()
        records, not_sent = _collect(tasks, samples, started, time.perf_counter() - t0)
        duration = (last_done if records else time.perf_counter()) - t0
        stop.set()
        if sampler_task is not None:
            await sampler_task
        after = await prom.scrape(client, cfg.api.base_url)
    out = RunOutput(records=records, duration=duration, not_sent=not_sent)
    if before is not None and after is not None:
        out.metrics_delta = {k: v for k, v in prom.delta(before, after).items() if v}
        out.spec = prom.spec_summary(out.metrics_delta) | prom.policy_summary(out.metrics_delta)
        out.timeline = sampler.timeline()
    return out


def _collect(
    tasks: list[asyncio.Task], samples: list[Sample], started: dict[int, float], now: float
) -> tuple[list[RequestRecord], int]:
    """Records in sample order; a cancelled task counts as failed if it had been sent."""
    records: list[RequestRecord] = []
    not_sent = 0
    for i, t in enumerate(tasks):
        if t.cancelled() and i not in started:
            not_sent += 1
        elif t.cancelled():
            records.append(
                RequestRecord(
                    index=i,
                    category=samples[i].category,
                    prompt_len=samples[i].prompt_len,
                    error="abandoned: still running at --duration + drain timeout",
                    start_time=started[i],
                    latency=now - started[i],
                )
            )
        elif t.exception() is not None:
            exc = t.exception()
            records.append(
                RequestRecord(
                    index=i,
                    category=samples[i].category,
                    prompt_len=samples[i].prompt_len,
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
        elif t.result() is None:
            not_sent += 1
        else:
            records.append(t.result())
    return records, not_sent
