"""Invalid requests get OpenAI error objects with the right status, and hurt nobody."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.api.live_server import LiveServer, run_server

M = "{model}"  # replaced by the served model name
USER = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any  # a JSON value, or bytes sent as-is
    status: int = 400
    param: str | None = None  # expected error.param, when the server can name one
    code: str | None = None


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": M, "messages": USER, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "hi", **kw}


C, CH = "/v1/completions", "/v1/chat/completions"
CASES = [
    Case("negative max_tokens", C, comp(max_tokens=-1), param="max_tokens"),
    Case("zero max_tokens", CH, chat(max_tokens=0), param="max_tokens"),
    Case("max_tokens as string", C, comp(max_tokens="5"), param="max_tokens"),
    Case("max_tokens as float", C, comp(max_tokens=5.5), param="max_tokens"),
    Case("temperature < 0", CH, chat(temperature=-0.5), param="temperature"),
    Case("temperature as string", CH, chat(temperature="hot"), param="temperature"),
    Case("top_p > 1", C, comp(top_p=1.5), param="top_p"),
    Case("top_p = 0", CH, chat(top_p=0), param="top_p"),
    Case("n = 0", CH, chat(n=0), param="n"),
    Case("n as bool", C, comp(n=True), param="n"),
    Case("presence_penalty > 2", C, comp(presence_penalty=3), param="presence_penalty"),
    Case("repetition_penalty = 0", C, comp(repetition_penalty=0), param="repetition_penalty"),
    Case("stream as string", CH, chat(stream="yes"), param="stream"),
    Case("stream_options without stream", CH, chat(stream_options={"include_usage": True}),
         param="stream_options"),
    Case("empty messages", CH, chat(messages=[]), param="messages"),
    Case("missing messages", CH, {"model": M}, param="messages"),
    Case("messages not a list", CH, chat(messages="hi"), param="messages"),
    Case("unknown role", CH, chat(messages=[{"role": "wizard", "content": "hi"}]),
         param="messages[0].role"),
    Case("content of wrong type", CH, chat(messages=[{"role": "user", "content": 5}]),
         param="messages[0].content"),
    Case("image content part", CH,
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         param="messages[0].content[0]"),
    Case("user message without content", CH, chat(messages=[{"role": "user"}]),
         param="messages[0].content"),
    Case("assistant message with neither content nor tool_calls", CH,
         chat(messages=[*USER, {"role": "assistant", "content": None}]),
         param="messages[1].content"),
    Case("tool message without tool_call_id", CH,
         chat(messages=[*USER, {"role": "tool", "content": "42"}]),
         param="messages[1].tool_call_id"),
    Case("tool_calls on a user message", CH,
         chat(messages=[{"role": "user", "content": "hi", "tool_calls": []}]),
         param="messages[0].tool_calls"),
    Case("empty content list", CH, chat(messages=[{"role": "user", "content": []}]),
         param="messages[0].content"),
    Case("lone surrogate in prompt", C, b'{"prompt": "hi \\ud800 there"}', param="prompt"),
    Case("lone surrogate in a message", CH,
         b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
         param="messages[0].content"),
    Case("seed beyond 64 bits", C, comp(seed=2**64 + 1), param="seed"),
    Case("max_tokens beyond 64 bits", CH, chat(max_tokens=10**30), param="max_tokens"),
    Case("temperature NaN", C, b'{"prompt": "hi", "temperature": NaN}', param="temperature"),
    Case("top_p Infinity", CH,
         b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
         param="top_p"),
    Case("deeply nested prompt", C, {"prompt": [[[[[[[[[[1]]]]]]]]]]}, param="prompt"),
    Case("missing prompt", C, {"model": M}, param="prompt"),
    Case("empty prompt", C, comp(prompt=""), param="prompt"),
    Case("empty prompt list", C, comp(prompt=[]), param="prompt"),
    Case("prompt of wrong type", C, comp(prompt={"text": "hi"}), param="prompt"),
    Case("mixed prompt list", C, comp(prompt=["hi", 5]), param="prompt"),
    Case("prompt too long", C, comp(prompt="hello world " * 400), code="context_length_exceeded"),
    Case("max_tokens beyond context", CH, chat(max_tokens=10**6),
         code="context_length_exceeded"),
    Case("token id out of vocab", C, comp(prompt=[1, 10**9]), param="prompt"),
    Case("negative token id", C, comp(prompt=[[-1]]), param="prompt"),
    Case("stop_token_ids out of vocab", C, comp(stop_token_ids=[10**9]), param="stop_token_ids"),
    Case("logprobs too large", C, comp(logprobs=21), param="logprobs"),
    Case("top_logprobs too large", CH, chat(logprobs=True, top_logprobs=21),
         param="top_logprobs"),
    Case("top_logprobs without logprobs", CH, chat(top_logprobs=2), param="top_logprobs"),
    Case("stop of wrong type", C, comp(stop=5), param="stop"),
    Case("stop list with a number", CH, chat(stop=["a", 1]), param="stop"),
    Case("logit_bias key not an id", C, comp(logit_bias={"abc": 1}), param="logit_bias"),
    Case("logit_bias out of range", C, comp(logit_bias={"1": 500}), param="logit_bias"),
    Case("tools set", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
         param="tools"),
    Case("response_format json", CH, chat(response_format={"type": "json_object"}),
         param="response_format"),
    Case("suffix set", C, comp(suffix="tail"), param="suffix"),
    Case("best_of != n", C, comp(best_of=3), param="best_of"),
    Case("speculation budget < 0", C, comp(speculation={"max_tokens": -1}), param="speculation"),
    Case("reserved chat_template_kwargs", CH, chat(chat_template_kwargs={"tokenize": True}),
         param="chat_template_kwargs"),
    Case("body not JSON", C, b"{not json"),
    Case("body a JSON array", CH, []),
    Case("unknown model", CH, chat(model="gpt-17"), status=404, param="model",
         code="model_not_found"),
    Case("unknown model (completions)", C, comp(model="gpt-17"), status=404,
         code="model_not_found"),
    # Per-request limits (ServerConfig's defaults): 400, code limit_exceeded, naming the param.
    Case("n beyond max_n", CH, chat(n=129), param="n", code="limit_exceeded"),
    Case("n x prompts beyond max_n", C, comp(prompt=["hi"] * 65, n=2), param="n",
         code="limit_exceeded"),
    Case("too many stop strings", C, comp(stop=[f"s{i}" for i in range(17)]), param="stop",
         code="limit_exceeded"),
    Case("stop string too long", CH, chat(stop="x" * 513), param="stop", code="limit_exceeded"),
    Case("too many logit_bias entries", C, comp(logit_bias={str(i): 1 for i in range(1025)}),
         param="logit_bias", code="limit_exceeded"),
    Case("logprobs beyond max_logprobs", C, comp(logprobs=10**6), param="logprobs",
         code="limit_exceeded"),
    Case("tokenize with nothing", "/tokenize", {}),
    Case("detokenize out of vocab", "/detokenize", {"tokens": [10**9]}, param="tokens"),
    Case("detokenize wrong type", "/detokenize", {"tokens": "abc"}, param="tokens"),
]  # fmt: skip


def _fill(value: Any, model: str) -> Any:
    if value == M:
        return model
    if isinstance(value, dict):
        return {k: _fill(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, model) for v in value]
    return value


def assert_error_shape(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def test_enough_cases() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request(case: Case, server: LiveServer, http: httpx.Client) -> None:
    if isinstance(case.body, bytes):
        r = http.post(case.path, content=case.body, headers={"content-type": "application/json"})
    else:
        r = http.post(case.path, json=_fill(case.body, server.model))
    error = assert_error_shape(r, case.status)
    if case.param is not None:
        assert error["param"] == case.param, error
    if case.code is not None:
        assert error["code"] == case.code, error


def test_server_still_serves_after_bad_requests(server: LiveServer, http: httpx.Client) -> None:
    for case in CASES:  # all of them again, back to back, then a normal request
        body = case.body if isinstance(case.body, bytes) else None
        if body is not None:
            http.post(case.path, content=body, headers={"content-type": "application/json"})
        else:
            http.post(case.path, json=_fill(case.body, server.model))
    assert http.get("/health").status_code == 200
    r = http.post(C, json={"model": server.model, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error_shape(http.get("/v1/nothing-here"), 404)
    assert_error_shape(http.get("/v1/completions"), 405)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("logs") / "keyed_server.log"
    with run_server(tiny_model_dir, log, api_key="sk-test-123") as live:
        yield live


def test_api_key(keyed_server: LiveServer) -> None:
    url = keyed_server.base_url
    body = {"model": keyed_server.model, "prompt": "hi", "max_tokens": 2}
    error = assert_error_shape(httpx.post(f"{url}/v1/completions", json=body), 401)
    assert error["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer nope"}
    assert_error_shape(httpx.get(f"{url}/v1/models", headers=wrong), 401)
    # Wrong key and bad body: auth answers first.
    assert_error_shape(httpx.post(f"{url}/v1/completions", content=b"{", headers=wrong), 401)
    right = {"Authorization": "Bearer sk-test-123"}
    assert httpx.get(f"{url}/v1/models", headers=right).status_code == 200
    assert (
        httpx.post(f"{url}/v1/completions", json=body, headers=right, timeout=60).status_code == 200
    )
    assert httpx.get(f"{url}/health").status_code == 200  # open, for load balancers
