"""The exact SSE wire format OpenAI clients parse, read with raw httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.api.live_server import LiveServer

MESSAGES = [{"role": "user", "content": "Paged attention stores keys"}]


def sse_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads in order; asserts the framing (blank line after every event)."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(event.removeprefix("data: "))
    return payloads


def test_chat_stream_shape_with_usage(server: LiveServer, http: httpx.Client) -> None:
    body = {
        "model": server.model, "messages": MESSAGES, "max_tokens": 6, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    payloads = sse_events(http, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == server.model and isinstance(c["created"], int) for c in chunks)

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert "cached_tokens" in usage["prompt_tokens_details"]
    # With include_usage, every other chunk carries "usage": null (as OpenAI).
    assert all("usage" in c and c["usage"] is None for c in choice_chunks)

    for index in (0, 1):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == index]
        assert all(len(c["choices"]) == 1 for c in choice_chunks)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[0]["finish_reason"] is None
        assert all("role" not in c["delta"] for c in mine[1:])
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert mine[-1]["finish_reason"] == "length"
        assert all(set(c["delta"]) <= {"content"} for c in mine[1:])


def test_chat_stream_without_usage_has_no_usage_field(
    server: LiveServer, http: httpx.Client
) -> None:
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    payloads = sse_events(http, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_stream_shape(server: LiveServer, http: httpx.Client) -> None:
    body = {
        "model": server.model, "prompt": "One two three", "max_tokens": 5, "stream": True,
        "logprobs": 2, "stream_options": {"include_usage": True}, "ignore_eos": True,
        # Greedy, so the tokens are fixed: sampled byte-level tokens may split a UTF-8
        # character, and then the token strings ("\ufffd") no longer spell the text.
        "temperature": 0,
    }  # fmt: skip
    payloads = sse_events(http, "/v1/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    choices = [c["choices"][0] for c in choice_chunks]
    assert all(set(c) >= {"index", "text", "logprobs", "finish_reason"} for c in choices)
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert choices[-1]["finish_reason"] == "length"
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert len(tokens) == 5
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    text = "".join(t for t in tokens if t not in specials)
    assert text == "".join(c["text"] for c in choices)
    offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_stream_error_before_streaming_is_plain_json(
    server: LiveServer, http: httpx.Client
) -> None:
    body = {"model": server.model, "messages": MESSAGES, "temperature": -1, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"
