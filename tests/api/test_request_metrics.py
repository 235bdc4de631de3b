"""The per-request metrics after real traffic: the success counter, the latency and token
histograms, and the token counters move exactly as the requests that were sent."""

from __future__ import annotations

import httpx

from loadtest.prom import delta, parse_text
from loadtest.sse import parse_sse_text
from tests.api.live_server import LiveServer
from tests.api.test_disconnect import wait_idle

HISTOGRAMS = (
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
)


def scrape(server: LiveServer) -> dict[str, float]:
    return parse_text(httpx.get(f"{server.base_url}/metrics", timeout=10).text)


def test_metrics_move_with_real_traffic(server: LiveServer, http: httpx.Client) -> None:
    assert wait_idle(server) == (0, 0)
    before = scrape(server)
    tokens: list[int] = []  # completion tokens per choice
    for i in range(3):
        body = {"model": server.model, "prompt": f"count {i}", "max_tokens": 5, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        tokens.append(r.json()["usage"]["completion_tokens"])
    body = {**body, "n": 2, "max_tokens": 3}
    usage = http.post("/v1/completions", json=body).json()["usage"]
    tokens += [usage["completion_tokens"] // 2] * 2
    for i in range(2):
        chat = {
            "model": server.model,
            "messages": [{"role": "user", "content": f"hello {i}"}],
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = parse_sse_text(http.post("/v1/chat/completions", json=chat).text)
        final = httpx.Response(200, content=events[-2]).json()
        tokens.append(final["usage"]["completion_tokens"])
    assert wait_idle(server) == (0, 0)
    d = delta(before, scrape(server))
    choices = len(tokens)
    assert d['specd:request_success_total{finished_reason="length"}'] == choices
    assert d['specd:request_success_total{finished_reason="stop"}'] == 0
    for name in HISTOGRAMS:
        assert d[f"specd:{name}_count"] == choices, name
        assert d[f"specd:{name}_sum"] >= 0, name
    assert d["specd:request_generation_tokens_sum"] == sum(tokens)
    assert d["specd:generation_tokens_total"] == sum(tokens)
    # No speculation on this server: one output per token, so a gap between each two.
    assert d["specd:inter_token_latency_seconds_count"] == sum(t - 1 for t in tokens)
    assert d["specd:e2e_request_latency_seconds_sum"] >= d["specd:time_to_first_token_seconds_sum"]
    assert scrape(server)["specd:num_requests_running"] == 0
