"""POST /v1/completions: one or more prompts, n choices each, streamed or not.

Choice index map (as OpenAI): prompt p's j-th choice is choice p * n + j, and its engine
request id is f"{id}-{p * n + j}".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import APIError, BadRequest, error_body, from_invalid_param
from server.api.logprobs import CompletionLogprobsBuilder, merge_completion_logprobs
from server.api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
    now,
)
from server.api.serving import (
    ChoiceUsage,
    ServingContext,
    merge_streams,
    request_ids,
    until_disconnected,
    with_deadline,
)
from server.api.sse import DONE, SSEResponse, sse_event
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import InvalidParamError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    token_ids: list[int]
    # What `echo` prepends: the prompt as sent, or the decoded ids when ids were sent.
    text: str
    params: SamplingParams


@dataclass
class Choice:
    """One choice being generated: its prompt and what has come back so far."""

    index: int
    prompt: Prompt
    usage: ChoiceUsage = field(default_factory=ChoiceUsage)
    logprobs: CompletionLogprobsBuilder | None = None
    logprob_parts: list[CompletionLogprobs] = field(default_factory=list)
    started: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _num_prompts(prompt: Any) -> int:
    """How many prompts a (validated) prompt field holds, without tokenising it."""
    if isinstance(prompt, str) or not prompt or all(type(t) is int for t in prompt):
        return 1
    return len(prompt)


class CompletionServer:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: CompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(body.model)
        deadline = ctx.deadline(body)
        ctx.check_admission()
        ctx.check_limits(body, num_prompts=_num_prompts(body.prompt))
        if body.suffix is not None:
            raise BadRequest("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequest(
                "best_of must be unset or equal to n: specd returns every candidate",
                param="best_of",
            )
        if body.stream_options is not None and not body.stream:
            raise BadRequest(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        prompts = [self._prompt(body, text, ids) for text, ids in self._split_prompts(body)]

        request_id, engine_id = request_ids(raw_request, "cmpl")
        ticket = ctx.admit(request_id, body, [p.token_ids for p in prompts], body.prompt)
        choices: list[Choice] = []
        streams: list[AsyncIterator[RequestOutput]] = []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                choice = Choice(index=index, prompt=prompt)
                if body.logprobs is not None:
                    choice.logprobs = CompletionLogprobsBuilder(ctx.strings)
                choices.append(choice)
                stream = ctx.client.generate(
                    f"{engine_id}-{index}", prompt.token_ids, prompt.params.for_child(j)
                )
                streams.append(with_deadline(ticket.track(index, stream), deadline))
        if body.stream:
            return SSEResponse(self._stream(body, request_id, choices, streams))
        response = await until_disconnected(
            raw_request,
            self._collect(body, request_id, choices, streams),
            ctx.config.disconnect_poll_interval,
        )
        return JSONResponse(response.model_dump())

    # -- prompts -------------------------------------------------------------------------------

    def _split_prompts(self, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt, in request order."""
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise BadRequest("prompt must not be empty", param="prompt")
        if all(type(t) is int for t in raw):
            raw = [raw]
        out: list[tuple[str | None, list[int]]] = []
        for item in raw:
            if isinstance(item, str):
                if not item:
                    raise BadRequest("prompt must not be empty", param="prompt")
                out.append((item, self.ctx.encode(item)))
            else:
                if not item:
                    raise BadRequest("prompt must not be empty", param="prompt")
                self.ctx.check_token_ids(item, "prompt")
                out.append((None, list(item)))
        return out

    def _prompt(self, body: CompletionRequest, text: str | None, ids: list[int]) -> Prompt:
        ctx = self.ctx
        max_tokens = ctx.resolve_max_tokens(body.max_tokens, len(ids), "prompt")
        want_prompt_logprobs = body.echo and body.logprobs is not None
        params = ctx.sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if want_prompt_logprobs else None,
        )
        if text is None:
            text = ctx.decode(ids) if body.echo else ""
        return Prompt(token_ids=ids, text=text, params=params)

    # -- per output ----------------------------------------------------------------------------

    def _delta(
        self, body: CompletionRequest, choice: Choice, out: RequestOutput
    ) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs this output adds to the choice (with the echo on the first)."""
        choice.usage.update(out)
        text = out.new_text
        parts: list[CompletionLogprobs] = []
        first = not choice.started
        choice.started = True
        if first and body.echo:
            text = choice.prompt.text + text
            if choice.logprobs is not None:
                ids = choice.prompt.token_ids
                prompt_lps = out.prompt_logprobs or [None] * len(ids)
                parts.append(choice.logprobs.build(prompt_lps, ids))
                # Output offsets count from the end of the echoed text, not of the token strings.
                choice.logprobs.offset = len(choice.prompt.text)
        if choice.logprobs is not None and out.new_logprobs:
            parts.append(choice.logprobs.build(out.new_logprobs))
        if out.finished:
            choice.finish_reason = out.finish_reason
            choice.stop_reason = out.stop_reason
        if choice.logprobs is None:
            return text, None
        return text, merge_completion_logprobs(parts)

    def _usage(self, choices: list[Choice], n: int) -> UsageInfo:
        # Prompt tokens count once per prompt (not per choice), as OpenAI does.
        prompt = sum(len(c.prompt.token_ids) for c in choices[::n])
        cached = sum(c.usage.num_cached_tokens for c in choices[::n])
        completion = sum(c.usage.num_output_tokens for c in choices)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            speculation=UsageInfo.speculation_of(
                sum(c.usage.num_draft_tokens for c in choices),
                sum(c.usage.num_accepted_tokens for c in choices),
            ),
        )

    # -- non-streaming -------------------------------------------------------------------------

    async def _collect(
        self,
        body: CompletionRequest,
        request_id: str,
        choices: list[Choice],
        streams: list[AsyncIterator[RequestOutput]],
    ) -> CompletionResponse:
        texts: list[list[str]] = [[] for _ in choices]
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                text, logprobs = self._delta(body, choices[index], out)
                texts[index].append(text)
                if logprobs is not None:
                    choices[index].logprob_parts.append(logprobs)
        return CompletionResponse(
            id=request_id,
            model=self.ctx.model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text="".join(texts[c.index]),
                    logprobs=(
                        merge_completion_logprobs(c.logprob_parts)
                        if c.logprobs is not None
                        else None
                    ),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in choices
            ],
            usage=self._usage(choices, body.n),
        )

    # -- streaming -----------------------------------------------------------------------------

    async def _stream(
        self,
        body: CompletionRequest,
        request_id: str,
        choices: list[Choice],
        streams: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[bytes]:
        created = now()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        exclude = None if include_usage else {"usage"}
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for index, out in merged:
                    choice = choices[index]
                    text, logprobs = self._delta(body, choice, out)
                    if not text and not out.finished and not (logprobs and logprobs.tokens):
                        continue
                    chunk = CompletionChunk(
                        id=request_id,
                        created=created,
                        model=self.ctx.model_name,
                        choices=[
                            CompletionChoice(
                                index=index,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=out.finish_reason,
                                stop_reason=out.stop_reason,
                            )
                        ],
                    )
                    yield sse_event(chunk, exclude=exclude)
            if include_usage:
                final = CompletionChunk(
                    id=request_id,
                    created=created,
                    model=self.ctx.model_name,
                    choices=[],
                    usage=self._usage(choices, body.n),
                )
                yield sse_event(final)
        except APIError as e:
            yield sse_event(e.body())
        except InvalidParamError as e:
            yield sse_event(from_invalid_param(e).body())
        except Exception as e:
            logger.exception(
                "completion stream %s failed", request_id, extra={"request_id": request_id}
            )
            yield sse_event(error_body(f"Internal server error: {type(e).__name__}: {e}", 500))
        yield DONE
