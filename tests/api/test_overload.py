"""Overload is refused early and politely: a burst of 10x the queue gets only 200 or 503
(with Retry-After), no timeout, every 200 complete, and nothing is left queued or in KV."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest

from loadtest.sse import parse_sse_text, sse_lines
from tests.api.live_server import LiveServer, run_server
from tests.api.test_bad_requests import assert_error_shape
from tests.api.test_disconnect import read_metric, wait_idle

QUEUE = 4
BURST = 10 * QUEUE
MAX_TOKENS = 48
BODY_LIMIT = 16384


@pytest.fixture(scope="module")
def small_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "overload_server.log"
    args = [
        "--max-num-seqs", "2",
        "--max-num-queued-reqs", str(QUEUE),
        "--max-request-body-bytes", str(BODY_LIMIT),
        "--num-kv-blocks", "256",
    ]  # fmt: skip
    with run_server(tiny_model_dir, log, extra_args=args) as live:
        yield live


def rejected(metrics: str, reason: str) -> float:
    match = re.search(
        rf'^specd:requests_rejected_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert match, f"no rejection series for {reason}"
    return float(match.group(1))


async def _one(client: httpx.AsyncClient, server: LiveServer, i: int) -> tuple[int, object]:
    """Every third request streams; the rest are plain. Returns (status, result)."""
    body = {
        "model": server.model,
        "prompt": f"burst request {i}",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": i % 3 == 0,
    }
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        return r.status_code, r
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r
        texts, finish = [], None
        async for line in sse_lines(r.aiter_text()):
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                texts.append(choice["text"])
                finish = choice["finish_reason"] or finish
        return 200, (finish, "".join(texts))


def test_a_burst_gets_only_200_or_503_and_every_200_is_complete(small_server: LiveServer) -> None:
    async def burst() -> list[tuple[int, object]]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(
            base_url=small_server.base_url, timeout=120, limits=limits
        ) as client:
            return await asyncio.gather(*(_one(client, small_server, i) for i in range(BURST)))

    before = httpx.get(f"{small_server.base_url}/metrics").text
    results = asyncio.run(burst())
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for status, r in results if status == 503]
    served = [r for status, r in results if status == 200]
    assert refused and served, statuses
    print(f"burst of {BURST} (queue {QUEUE}): {len(served)} served, {len(refused)} refused")
    for r in refused:
        assert isinstance(r, httpx.Response)
        error = assert_error_shape(r, 503)
        assert error["code"] == "queue_full"
        assert 1 <= int(r.headers["retry-after"]) <= 60
    for r in served:
        if isinstance(r, httpx.Response):
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        else:
            finish, text = r  # type: ignore[misc]
            assert finish == "length" and text
    after = httpx.get(f"{small_server.base_url}/metrics").text
    counted = rejected(after, "queue_requests") - rejected(before, "queue_requests")
    assert counted == len(refused)
    running, kv = wait_idle(small_server)
    assert (running, kv) == (0, 0)
    idle = httpx.get(f"{small_server.base_url}/metrics").text
    assert read_metric(idle, "specd:admission_queued_requests") == 0
    assert read_metric(idle, "specd:admission_queued_tokens") == 0


def test_a_body_over_the_limit_gets_413_before_parsing(small_server: LiveServer) -> None:
    url = f"{small_server.base_url}/v1/completions"
    big = b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}'
    error = assert_error_shape(
        httpx.post(url, content=big, headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    assert_error_shape(httpx.post(url, content=chunks()), 413)
    metrics = httpx.get(f"{small_server.base_url}/metrics").text
    assert rejected(metrics, "body_too_large") >= 2
    # Just under the limit is parsed as usual.
    body = {"model": small_server.model, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=60).status_code == 200


def test_a_request_timeout_aborts_the_request_and_frees_its_kv(small_server: LiveServer) -> None:
    url = f"{small_server.base_url}/v1/completions"
    body = {
        "model": small_server.model,
        "prompt": "take your time",
        "max_tokens": 200,
        "ignore_eos": True,
        "timeout": 0.001,
    }
    error = assert_error_shape(httpx.post(url, json=body, timeout=60), 408)
    assert error["code"] == "timeout"
    with httpx.stream("POST", url, json={**body, "stream": True, "timeout": 0.05}) as r:
        events = [e for e in parse_sse_text(r.read().decode()) if e]
    assert events[-1] == "[DONE]"
    assert '"code": "timeout"' in events[-2] or '"code":"timeout"' in events[-2], events[-3:]
    assert assert_error_shape(httpx.post(url, json={**body, "timeout": 0}), 400)["param"] == (
        "timeout"
    )
    assert wait_idle(small_server) == (0, 0)
