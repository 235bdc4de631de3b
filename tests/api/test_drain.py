"""Graceful drain: SIGTERM during 10 in-flight streams. All 10 complete with [DONE], new
requests get 503 with Retry-After, /ready is 503 (and /health 200) during the drain, and the
process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from loadtest.sse import DONE, sse_lines
from tests.api.live_server import run_server
from tests.api.test_bad_requests import assert_error_shape

STREAMS = 10
MAX_TOKENS = 200


async def _stream(client: httpx.AsyncClient, model: str, i: int, started: asyncio.Event) -> list:
    body = {
        "model": model,
        "prompt": f"drain me {i}",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    events: list = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        started.set()
        async for line in sse_lines(r.aiter_text()):
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == DONE else json.loads(data))
    return events


def test_sigterm_drains_in_flight_streams_then_exits_0(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("logs") / "drain_server.log"
    # One request at a time: the 10 streams take long enough to still be running at SIGTERM.
    args = ["--max-num-seqs", "1", "--shutdown-timeout", "120"]
    with run_server(tiny_model_dir, log, extra_args=args) as live:
        assert live.proc is not None

        async def run() -> tuple[list[list], httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=120) as client:
                starts = [asyncio.Event() for _ in range(STREAMS)]
                tasks = [
                    asyncio.ensure_future(_stream(client, live.model, i, starts[i]))
                    for i in range(STREAMS)
                ]
                await asyncio.gather(*(s.wait() for s in starts))
                live.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)  # the next on_tick sees it
                ready = await client.get("/ready")
                health = await client.get("/health")
                body = {"model": live.model, "prompt": "too late", "max_tokens": 2}
                refused = await client.post("/v1/completions", json=body)
                return await asyncio.gather(*tasks), ready, health, refused

        results, ready, health, refused = asyncio.run(run())
        assert_error_shape(ready, 503)
        assert health.status_code == 200
        error = assert_error_shape(refused, 503)
        assert error["code"] == "draining" and refused.headers["retry-after"] == "1"
        for events in results:
            assert events[-1] == DONE
            texts = [e["choices"][0] for e in events[:-1] if e["choices"]]
            assert texts[-1]["finish_reason"] == "length"
        assert live.proc.wait(timeout=60) == 0
