"""The embedded SmolLM2-135M-Instruct behind a live server: what a first-time user sees."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.live_server import LiveServer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def smol(smol_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.v1, api_key="unused", max_retries=0)


def test_chat_answers_and_counts_tokens(smol_server: LiveServer, smol: openai.OpenAI) -> None:
    r = smol.chat.completions.create(
        model=smol_server.model,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    answer = r.choices[0].message.content or ""
    assert "Paris" in answer, answer
    tokens = httpx.post(f"{smol_server.base_url}/tokenize", json={"messages": QUESTION}).json()
    assert r.usage is not None and r.usage.prompt_tokens == tokens["count"]
    # ChatML: the template's own system prompt, the question, the generation prompt; no BOS.
    text = httpx.post(f"{smol_server.base_url}/detokenize", json={"tokens": tokens["tokens"]})
    assert text.json()["prompt"].endswith("<|im_start|>assistant\n")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_ends_on_eos_with_stop(smol_server: LiveServer, smol: openai.OpenAI) -> None:
    r = smol.chat.completions.create(
        model=smol_server.model,
        messages=QUESTION,
        max_tokens=200,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason == "stop"
    assert "<|im_end|>" not in (r.choices[0].message.content or "")


def test_streaming_matches_and_prefix_cache_reports(
    smol_server: LiveServer, smol: openai.OpenAI
) -> None:
    kwargs = dict(model=smol_server.model, messages=QUESTION, max_tokens=16, temperature=0)
    full = smol.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        smol.chat.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[call-overload]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]
    # The same prompt again: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_completion_with_logprobs(smol_server: LiveServer, smol: openai.OpenAI) -> None:
    r = smol.completions.create(
        model=smol_server.model, prompt="The capital of France is", max_tokens=4, temperature=0,
        logprobs=2,
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and len(lp.token_logprobs) == 4
    assert "Paris" in r.choices[0].text
