"""Clients that go away mid-request must not leave requests running or KV blocks held."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from loadtest.sse import sse_lines
from tests.api.live_server import LiveServer

# Long enough that no request finishes before the client leaves.
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


def read_metric(text: str, name: str) -> float:
    """The value of an unlabelled-or-labelled gauge `name` in Prometheus text format."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    match = pattern.search(text)
    assert match, f"{name} not in /metrics:\n{text[:2000]}"
    return float(match.group(2))


def wait_idle(server: LiveServer, timeout_s: float = 20) -> tuple[float, float]:
    """Polls /metrics until nothing runs and no KV is used; returns the last (running, kv)."""
    deadline = time.monotonic() + timeout_s
    running = kv = -1.0
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        running = read_metric(text, "specd:num_requests_running")
        waiting = read_metric(text, "specd:num_requests_waiting")
        kv = read_metric(text, "specd:kv_cache_usage_perc")
        if running == 0 and waiting == 0 and kv == 0:
            break
        time.sleep(0.2)
    return running, kv


async def _stream_then_leave(client: httpx.AsyncClient, server: LiveServer, i: int) -> int:
    """Reads a few SSE events of a long stream, then drops the connection."""
    if i % 2:
        path = "/v1/chat/completions"
        body = {"model": server.model, "messages": [{"role": "user", "content": f"hi {i}"}]}
    else:
        path = "/v1/completions"
        body = {"model": server.model, "prompt": f"The quick brown fox {i}", "n": 2}
    seen = 0
    async with client.stream("POST", path, json={**body, **LONG, "stream": True}) as r:
        assert r.status_code == 200
        async for line in sse_lines(r.aiter_text()):
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the request finished before the client left"
                seen += 1
                if seen >= 3:
                    break
    return seen


async def test_streaming_clients_cancelled_midway_free_everything(server: LiveServer) -> None:
    assert wait_idle(server) == (0, 0), "server not idle before the test"
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
        seen = await asyncio.gather(*(_stream_then_leave(client, server, i) for i in range(20)))
    assert all(s >= 3 for s in seen)
    assert await asyncio.to_thread(wait_idle, server) == (0, 0)


async def test_non_streaming_clients_that_leave_free_everything(server: LiveServer) -> None:
    async def leave_early(i: int) -> bool:
        """True when the client gave up before the answer came."""
        async with httpx.AsyncClient(base_url=server.base_url, timeout=0.2) as client:
            body = {
                "model": server.model,
                "prompt": f"One two three {i}",
                **LONG,
                "max_tokens": 240,
            }
            try:
                await client.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                return True
            return False

    left = await asyncio.gather(*(leave_early(i) for i in range(8)))
    assert any(left), "every request finished before its client left: nothing was tested"
    assert await asyncio.to_thread(wait_idle, server) == (0, 0)


def test_server_serves_after_disconnects(server: LiveServer) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": server.model, "prompt": "hi", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
