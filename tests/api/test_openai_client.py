"""The official `openai` client against a live `specd serve` (tiny random Llama)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx
import openai
import pytest

from tests.api.live_server import LiveServer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox"},
]
PROMPT = "Hello, world! How are you"


# The tiny tokenizer's special tokens: logprobs name them, the text skips them.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def without_specials(tokens: Iterable[str]) -> str:
    return "".join(t for t in tokens if t not in SPECIALS)


def tokenize(http: httpx.Client, **body: object) -> list[int]:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def test_models_health_version(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].owned_by == "specd"
    assert models[0].model_extra and models[0].model_extra["max_model_len"] == server.max_model_len
    assert client.models.retrieve(server.model).id == server.model
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_completion_basic_and_usage(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    r = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == server.model
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenize(http, prompt=PROMPT))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_basic_and_usage(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenize(http, messages=MESSAGES))
    assert r.usage.completion_tokens == 6


def test_chat_without_max_tokens_uses_remaining_context(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    n_prompt = len(tokenize(http, messages=MESSAGES))
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == server.max_model_len - n_prompt


def test_chat_prompt_matches_transformers_template(
    server: LiveServer, http: httpx.Client, tiny_model_dir: str
) -> None:
    """The server's chat prompt is token-for-token transformers' own (no doubled BOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert tokenize(http, messages=MESSAGES) == list(expected)
    assert tokenize(http, prompt=PROMPT) == tok(PROMPT)["input_ids"]


def test_streaming_equals_non_streaming(server: LiveServer, client: openai.OpenAI) -> None:
    kwargs = dict(model=server.model, max_tokens=12, temperature=0)
    full = client.chat.completions.create(messages=MESSAGES, **kwargs)  # type: ignore[call-overload]
    parts = []
    for chunk in client.chat.completions.create(messages=MESSAGES, stream=True, **kwargs):  # type: ignore[call-overload]
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    assert "".join(parts) == full.choices[0].message.content

    full_c = client.completions.create(prompt=PROMPT, **kwargs)  # type: ignore[call-overload]
    streamed = "".join(
        c.text
        for chunk in client.completions.create(prompt=PROMPT, stream=True, **kwargs)  # type: ignore[call-overload]
        for c in chunk.choices
    )
    assert streamed == full_c.choices[0].text


def test_n_choices(server: LiveServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=5, n=2, seed=3,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 10

    stream = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=5, n=2, stream=True,  # type: ignore[arg-type]
    )  # fmt: skip
    finished = {c.index for chunk in stream for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1}


def test_multi_prompt_choice_indices(server: LiveServer, client: openai.OpenAI) -> None:
    prompts = ["One two three", "The quick brown"]
    single = [
        client.completions.create(model=server.model, prompt=p, max_tokens=6, temperature=0)
        .choices[0].text
        for p in prompts
    ]  # fmt: skip
    r = client.completions.create(
        model=server.model, prompt=prompts, max_tokens=6, n=2, temperature=0
    )
    by_index = {c.index: c.text for c in r.choices}
    # OpenAI's map: prompt p, choice j -> index p * n + j.
    assert by_index == {0: single[0], 1: single[0], 2: single[1], 3: single[1]}
    assert r.usage is not None
    assert r.usage.prompt_tokens == sum(
        client.completions.create(model=server.model, prompt=p, max_tokens=1).usage.prompt_tokens  # type: ignore[union-attr]
        for p in prompts
    )


def test_token_id_prompt_matches_text_prompt(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    ids = tokenize(http, prompt=PROMPT)
    a = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    b = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT


def test_seed_reproducible(server: LiveServer, client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=server.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_greedy_is_deterministic(server: LiveServer, client: openai.OpenAI) -> None:
    texts = {
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0)
        .choices[0].text
        for _ in range(3)
    }  # fmt: skip
    assert len(texts) == 1


def test_stop_string(server: LiveServer, client: openai.OpenAI) -> None:
    base = dict(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0)
    text = client.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].text  # type: ignore[call-overload]
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)
    if stop is None:
        pytest.skip(f"greedy text has no ASCII letter to stop on: {text!r}")
    expected = text[: text.index(stop)]
    r = client.completions.create(**base, stop=[stop], extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        **base,
        stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},  # type: ignore[call-overload]
    )
    assert kept.choices[0].text == expected + stop


def test_completion_logprobs_and_echo(
    server: LiveServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    r = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert without_specials(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0
        assert 1 <= len(top) <= 4
        assert chosen >= max(top.values()) - 1e-4  # greedy picks the argmax
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    n_prompt = len(tokenize(http, prompt=PROMPT))
    e = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, echo=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert e.choices[0].text == PROMPT + r.choices[0].text
    elp = e.choices[0].logprobs
    assert elp is not None and elp.token_logprobs and elp.top_logprobs
    assert len(elp.token_logprobs) == n_prompt + 5
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(x is not None for x in elp.token_logprobs[1:])
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_chat_logprobs(server: LiveServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, temperature=0,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
        assert item.bytes == list(item.token.encode())
    assert without_specials(i.token for i in content) == r.choices[0].message.content

    plain = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert plain.choices[0].logprobs is None


def test_bad_request_raises_openai_errors(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=server.model, prompt="x", temperature=-1)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="no-such-model",
            messages=MESSAGES,  # type: ignore[arg-type]
        )
    assert missing.value.code == "model_not_found"


async def test_async_client_concurrent(server: LiveServer, aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        r = await aclient.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=8, temperature=0,  # type: ignore[arg-type]
        )  # fmt: skip
        return r.choices[0].message.content or ""

    async def streamed() -> str:
        stream = await aclient.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)), streamed(), streamed())
    # Batched with each other, every greedy request still gets the same tokens.
    assert len(set(texts)) == 1
    await aclient.close()
