"""Faults, each injected for real inside the engine (server/engine/faults.py), fail only what
they touch: NaN logits fail that request alone; an exception in a step fails that step's
requests and the engine serves on; a dead engine process turns /health to 503 and errors every
in-flight request within seconds; KV exhaustion preempts and loses nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from loadtest.sse import sse_lines
from tests.api.live_server import LiveServer, run_server
from tests.api.test_bad_requests import assert_error_shape
from tests.api.test_disconnect import read_metric, wait_idle

NAN, STEP_ERROR, EXIT = 301, 302, 303
FAULTS = json.dumps({"nan_logits": NAN, "step_error": STEP_ERROR, "exit": EXIT})
NORMAL_PROMPTS = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]
MAX_TOKENS = 24


def _start(model: str, tmp: pytest.TempPathFactory, name: str, *args: str):  # type: ignore[no-untyped-def]
    log = tmp.mktemp("logs") / f"{name}.log"
    return run_server(model, log, extra_args=list(args), env={"SPECD_INJECT_FAULTS": FAULTS})


@pytest.fixture(scope="module")
def faulty_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    with _start(tiny_model_dir, tmp_path_factory, "faulty", "--num-kv-blocks", "256") as live:
        yield live


def _body(server: LiveServer, prompt: list[int], **kw: object) -> dict[str, object]:
    return {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **kw,
    }


async def _post(client: httpx.AsyncClient, body: dict[str, object]) -> httpx.Response:
    return await client.post("/v1/completions", json=body)


async def _stream_events(client: httpx.AsyncClient, body: dict[str, object]) -> list[object]:
    """Every SSE data payload of a streamed completion, parsed ("[DONE]" kept as a string)."""
    events: list[object] = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        async for line in sse_lines(r.aiter_text()):
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _together(server: LiveServer, *bodies: dict[str, object]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(_post(client, b) for b in bodies))

    return asyncio.run(run())


def _texts(responses: list[httpx.Response]) -> list[str]:
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    return [r.json()["choices"][0]["text"] for r in responses]


def test_nan_logits_fail_that_request_alone(faulty_server: LiveServer) -> None:
    normal = [_body(faulty_server, p) for p in NORMAL_PROMPTS]
    alone = _texts(_together(faulty_server, *normal))
    *others, poisoned = _together(faulty_server, *normal, _body(faulty_server, [NAN, 5, 6]))
    error = assert_error_shape(poisoned, 500)
    assert "NaN" in error["message"]
    # The others shared its batches for its first two tokens and finished unchanged.
    assert _texts(others) == alone

    async def streamed() -> list[object]:
        async with httpx.AsyncClient(base_url=faulty_server.base_url, timeout=120) as client:
            return await _stream_events(client, _body(faulty_server, [NAN, 7]))

    events = asyncio.run(streamed())
    assert events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and "error" in e for e in events), events
    assert wait_idle(faulty_server) == (0, 0)


def test_a_step_exception_fails_its_requests_and_the_engine_serves_on(
    faulty_server: LiveServer,
) -> None:
    (failed,) = _together(faulty_server, _body(faulty_server, [STEP_ERROR, 5]))
    error = assert_error_shape(failed, 500)
    assert "injected step error" in error["message"]
    assert httpx.get(f"{faulty_server.base_url}/health").status_code == 200
    normal = [_body(faulty_server, p) for p in NORMAL_PROMPTS]
    assert len(_texts(_together(faulty_server, *normal))) == len(NORMAL_PROMPTS)
    assert wait_idle(faulty_server) == (0, 0)


def test_kv_exhaustion_preempts_and_loses_nothing(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # 12 blocks x 16 tokens: six requests of ~100 tokens each cannot all hold their KV.
    prompts = [[40 + i, 41 + i, 42 + i, 43 + i] for i in range(6)]
    with _start(tiny_model_dir, tmp_path_factory, "small_kv", "--num-kv-blocks", "12") as live:
        bodies = [_body(live, p, max_tokens=96) for p in prompts]
        alone = []
        for b in bodies:
            (r,) = _together(live, b)
            assert r.status_code == 200, r.text
            alone.append(r.json()["choices"][0]["text"])
        together = _together(live, *bodies)
        for r in together:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 96
        assert [r.json()["choices"][0]["text"] for r in together] == alone
        metrics = httpx.get(f"{live.base_url}/metrics").text
        assert read_metric(metrics, "specd:num_preemptions_total") > 0
        assert wait_idle(live) == (0, 0)


def test_a_dead_engine_fails_in_flight_requests_within_seconds(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _start(tiny_model_dir, tmp_path_factory, "dying", "--num-kv-blocks", "256") as live:

        async def run() -> tuple[list[httpx.Response], list[object], httpx.Response, float]:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
                long = [_body(live, p, max_tokens=200) for p in NORMAL_PROMPTS]
                plain = [asyncio.ensure_future(_post(client, b)) for b in long]
                stream = asyncio.ensure_future(_stream_events(client, long[0]))
                await asyncio.sleep(0.5)  # all in flight
                start = time.monotonic()
                killer = await _post(client, _body(live, [EXIT, 5]))
                results = await asyncio.gather(*plain)
                events = await stream
                return results, events, killer, time.monotonic() - start

        results, events, killer, seconds = asyncio.run(run())
        assert seconds < 10
        for r in [*results, killer]:
            # A request that finished before the crash is fine; none may hang or lose its body.
            if r.status_code != 200:
                assert_error_shape(r, 503)
        assert killer.status_code == 503
        assert events[-1] == "[DONE]"
        health = httpx.get(f"{live.base_url}/health")
        assert_error_shape(health, 503)
        refused = httpx.post(f"{live.base_url}/v1/completions", json=_body(live, [5]))
        assert_error_shape(refused, 503)
