"""One streamed request to an OpenAI-compatible server, timed with time.perf_counter."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.records import RequestRecord, Sample
from loadtest.sse import SSEDecoder, error_message, interpret, sse_lines

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ApiConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(api: ApiConfig, sample: Sample) -> dict[str, Any]:
    """The JSON body: greedy by default, streamed, with usage in a final chunk."""
    body: dict[str, Any] = {
        "model": api.model,
        "max_tokens": sample.output_len,
        "temperature": api.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api.ignore_eos:
        # A vLLM extension that llama-server and specd accept too.
        body["ignore_eos"] = True
    if api.chat:
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    return body


async def send_request(
    client: httpx.AsyncClient, api: ApiConfig, sample: Sample, index: int, run_start: float
) -> RequestRecord:
    """Send one request and time it. Never raises for server or transport errors: they come
    back as a record with success=False and the message in `error`."""
    rec = RequestRecord(index=index, category=sample.category, prompt_len=sample.prompt_len)
    st = time.perf_counter()
    rec.start_time = st - run_start
    try:
        await _stream(client, api, sample, rec, st)
    except httpx.HTTPError as e:
        rec.success = False
        rec.error = f"{type(e).__name__}: {e}".rstrip(": ")
    return rec


async def _stream(
    client: httpx.AsyncClient, api: ApiConfig, sample: Sample, rec: RequestRecord, st: float
) -> None:
    payload = build_payload(api, sample)
    async with client.stream("POST", api.url, json=payload, headers=api.headers) as resp:
        rec.status_code = resp.status_code
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            try:
                msg = error_message(json.loads(body))
            except json.JSONDecodeError:
                msg = body[:500]
            rec.error = f"HTTP {resp.status_code}: {msg}"
            return
        decoder = SSEDecoder()
        last = st
        text_parts: list[str] = []
        usage_tokens: int | None = None
        async for line in sse_lines(resp.aiter_text()):
            data = decoder.feed_line(line)
            if data is None:
                continue
            now = time.perf_counter()
            chunk = interpret(data)
            if chunk.error:
                rec.error = chunk.error
                break
            if chunk.done:
                break
            if chunk.text:
                if rec.num_chunks == 0:
                    rec.ttft = now - st
                else:
                    rec.itl.append(now - last)
                last = now
                rec.num_chunks += 1
                text_parts.append(chunk.text)
            if chunk.finish_reason:
                rec.finish_reason = chunk.finish_reason
                if rec.num_chunks == 0:
                    # Finished without text (e.g. EOS first): that chunk is the first "token".
                    rec.ttft, last = now - st, now
            if chunk.completion_tokens is not None:
                usage_tokens = chunk.completion_tokens
            if chunk.prompt_tokens is not None:
                rec.prompt_len = chunk.prompt_tokens
        rec.generated_text = "".join(text_parts)
        rec.latency = last - st
        if usage_tokens is not None:
            rec.output_len, rec.token_source = usage_tokens, "usage"
        else:
            rec.output_len, rec.token_source = rec.num_chunks, "chunks"
        if not rec.error and rec.finish_reason is None and rec.num_chunks == 0:
            rec.error = "stream ended without any text or finish_reason"
        rec.success = not rec.error
