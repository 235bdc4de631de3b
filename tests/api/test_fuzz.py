"""Fuzzing the generation endpoints of a live server with hypothesis: sampling parameters and
prompts at and past their limits - invalid Unicode, huge and negative integers, NaN and
infinite floats, deep nesting, empty lists, wrong types. Every answer is a 2xx or a 4xx in
OpenAI's error shape, never a 5xx; afterwards the server is healthy, nothing is queued and no
KV block is in use. Examples are derandomized (the same ones every CI run) and bounded."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.sse import parse_sse_text
from tests.api.live_server import LiveServer, run_server
from tests.api.test_bad_requests import assert_error_shape
from tests.api.test_disconnect import read_metric, wait_idle

EXAMPLES = 100
SCHEMA_EXAMPLES = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

LONE_SURROGATES = ["\ud800", "\udfff", "\ud83d"]
texts = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda a, s, b: a + s + b,
        st.text(max_size=8),
        st.sampled_from(LONE_SURROGATES),
        st.text(max_size=8),
    ),
    st.just(""),
)
huge_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30]),
)
ints = st.one_of(st.integers(min_value=-3, max_value=400), huge_ints)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e308, -1e308, 5e-324, 1.0, 2.0, 0.5]),
)
junk: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=6,
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


# Each example is mostly valid, with at most one field drawn wild: an example with a wild
# value in every field would only ever test the first validator it meets.
VOCAB = 320  # the tiny test model's
valid_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
valid_ids = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=6)
token_ids = st.lists(ints, max_size=6)
VALID_PROMPTS = st.one_of(valid_text, valid_ids, st.lists(valid_text, min_size=1, max_size=2))
WILD_PROMPTS = st.one_of(
    texts,
    token_ids,
    st.lists(texts, max_size=3),
    st.lists(token_ids, max_size=3),
    st.builds(deep, st.just(1), st.integers(min_value=2, max_value=64)),
    junk,
)
prompts = st.one_of(VALID_PROMPTS, VALID_PROMPTS, WILD_PROMPTS)
unit = st.floats(min_value=0, max_value=1)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(min_value=1, max_value=6),
    "n": st.integers(min_value=1, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=50),
    "min_p": unit,
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.5, max_value=2),
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=VOCAB - 1).map(str),
        st.floats(min_value=-100, max_value=100),
        max_size=3,
    ),
    "stop": st.one_of(valid_text, st.lists(valid_text, max_size=3)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "speculation": st.fixed_dictionaries({"max_tokens": st.integers(0, 8)}),
}
WILD: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.one_of(huge_ints, floats, texts, junk),
    "n": st.one_of(huge_ints, st.integers(min_value=-1, max_value=0), junk),
    "temperature": floats,
    "top_p": floats,
    "top_k": huge_ints,
    "min_p": floats,
    "seed": huge_ints,
    "presence_penalty": floats,
    "frequency_penalty": floats,
    "repetition_penalty": floats,
    "logit_bias": st.one_of(
        st.dictionaries(st.one_of(texts, ints.map(str)), floats, max_size=4), junk
    ),
    "stop": st.one_of(texts, st.lists(texts, max_size=20), junk),
    "stop_token_ids": st.one_of(token_ids, junk),
    "ignore_eos": junk,
    "stream": junk,
    "speculation": st.one_of(st.fixed_dictionaries({"max_tokens": huge_ints}), junk),
    "logprobs": st.one_of(ints, junk),
    "top_logprobs": ints,
    "echo": junk,
}
COMPLETION_ONLY = {"logprobs": st.integers(min_value=0, max_value=5), "echo": st.booleans()}
CHAT_ONLY = {"logprobs": st.booleans(), "top_logprobs": st.integers(min_value=0, max_value=5)}


@st.composite
def sampling(draw: st.DrawFn, extra: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    params = draw(st.fixed_dictionaries({}, optional={**VALID, **extra}))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(WILD)))
        params[key] = draw(WILD[key])
    return params


roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), texts)
content = st.one_of(
    texts,
    st.none(),
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}),
        max_size=2,
    ),
    junk,
)
wild_message = st.fixed_dictionaries(
    {"role": roles}, optional={"content": content, "name": texts, "tool_call_id": texts}
)
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": valid_text}
)
VALID_MESSAGES = st.builds(
    lambda head, last: [*head, last],
    st.lists(valid_message, max_size=2),
    st.fixed_dictionaries({"role": st.just("user"), "content": valid_text}),
)
messages = st.one_of(VALID_MESSAGES, VALID_MESSAGES, st.lists(wild_message, max_size=3), junk)


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "fuzz_server.log"
    with run_server(tiny_model_dir, log, extra_args=["--num-kv-blocks", "256"]) as live:
        yield live


@pytest.fixture(scope="module")
def http(fuzz_server: LiveServer) -> Iterator[httpx.Client]:
    with fuzz_server.http() as client:
        yield client


# (path, status) -> answers, so the last test can show the fuzzers got past validation too.
TALLY: Counter[tuple[str, int]] = Counter()


def send(http: httpx.Client, path: str, body: Any) -> None:
    """Posts ``body`` as JSON (surrogates escaped, NaN as NaN) and checks the answer."""
    data = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    headers = {"content-type": "application/json"}
    with http.stream("POST", path, content=data, headers=headers) as r:
        raw = r.read()
    TALLY[path, r.status_code] += 1
    assert r.status_code < 500, (r.status_code, raw[:500], data[:500])
    if r.status_code >= 400:
        assert_error_shape(
            httpx.Response(r.status_code, headers=r.headers, content=raw), r.status_code
        )
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = parse_sse_text(raw.decode())
        assert events and events[-1] == "[DONE]", raw[-300:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        assert json.loads(raw)["choices"], raw[:300]


@FUZZ
@given(prompt=prompts, params=sampling(COMPLETION_ONLY))
def test_fuzz_completions(
    http: httpx.Client, fuzz_server: LiveServer, prompt: Any, params: dict[str, Any]
) -> None:
    send(http, "/v1/completions", {"model": fuzz_server.model, "prompt": prompt, **params})


@FUZZ
@given(msgs=messages, params=sampling(CHAT_ONLY))
def test_fuzz_chat_completions(
    http: httpx.Client, fuzz_server: LiveServer, msgs: Any, params: dict[str, Any]
) -> None:
    send(http, "/v1/chat/completions", {"model": fuzz_server.model, "messages": msgs, **params})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schemathesis_finds_no_server_error(fuzz_server: LiveServer, path: str) -> None:
    """Bodies generated from the server's own OpenAPI schema (what pydantic lets through
    and a little past it): never a 5xx, and every 4xx in OpenAI's error shape.

    schemathesis is used as a library (its strategies under our own hypothesis settings):
    its pytest plugin does not run under this pytest (9.x)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    operation = schema[path]["POST"]

    @settings(
        max_examples=SCHEMA_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=fuzz_server.base_url, timeout=60)
        TALLY[path, response.status_code] += 1
        assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
        if response.status_code >= 400:
            # schemathesis keeps each header as a list of values.
            headers = {k: v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
            answer = httpx.Response(response.status_code, headers=headers, content=response.content)
            assert_error_shape(answer, response.status_code)

    check()


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_bodies_are_refused(http: httpx.Client, depth: int) -> None:
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error_shape(r, 400)


def test_the_server_is_healthy_and_idle_after_fuzzing(
    http: httpx.Client, fuzz_server: LiveServer
) -> None:
    # Module order runs this after the fuzzers above. Both reached the engine, not just the
    # validators, and refused much: a fuzzer that only ever hits 400 tests little.
    print("fuzz answers by (path, status):", dict(TALLY))
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert TALLY[path, 200] >= 3, TALLY
        assert sum(n for (p, s), n in TALLY.items() if p == path and s >= 400) >= 10, TALLY
    assert http.get("/health").status_code == 200
    assert wait_idle(fuzz_server) == (0, 0)
    metrics = http.get("/metrics").text
    assert read_metric(metrics, "specd:admission_queued_requests") == 0
    body = {"model": fuzz_server.model, "prompt": "still here", "max_tokens": 3}
    assert http.post("/v1/completions", json=body).status_code == 200
