"""X-Request-Id is honoured (the response's id) and echoed on every answer, errors included."""

from __future__ import annotations

import asyncio

import httpx

from tests.api.live_server import LiveServer


def test_x_request_id_is_the_id_and_is_echoed(server: LiveServer, http: httpx.Client) -> None:
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2}
    r = http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42.a"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42.a"
    assert r.json()["id"] == "trace-42.a"
    bad = http.post("/v1/completions", json={**body, "n": 0}, headers={"X-Request-Id": "t-1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "t-1"
    # An id that is not tame enough for logs is echoed but not used.
    odd = http.post("/v1/completions", json=body, headers={"X-Request-Id": "has spaces"})
    assert odd.headers["x-request-id"] == "has spaces"
    assert odd.json()["id"].startswith("cmpl-")
    assert "x-request-id" not in http.post("/v1/completions", json=body).headers


def test_two_requests_may_share_an_x_request_id(server: LiveServer) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            chat = {
                "model": server.model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8,
                "ignore_eos": True,
            }
            headers = {"X-Request-Id": "same"}
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=chat, headers=headers) for _ in range(3))
            )

    for r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "same"
        assert r.json()["usage"]["completion_tokens"] == 8
