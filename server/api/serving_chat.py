"""POST /v1/chat/completions: the chat template, n choices, streamed or not.

Streaming order per choice, as OpenAI: a first chunk with delta {"role": "assistant",
"content": ""}, content deltas with finish_reason null, a last chunk carrying finish_reason;
then (stream_options.include_usage) one chunk with choices [] and the usage; then [DONE].
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import APIError, BadRequest, error_body, from_invalid_param
from server.api.logprobs import chat_logprobs
from server.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    PromptTokensDetails,
    TokenLogprob,
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
from server.engine.sampling_params import InvalidParamError

logger = logging.getLogger(__name__)


class ChatServer:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(body.model)
        deadline = ctx.deadline(body)
        ctx.check_admission()
        ctx.check_limits(body)
        self._check_unsupported(body)
        prompt_ids = ctx.chat_prompt_ids(body)
        if not prompt_ids:
            raise BadRequest("The rendered chat prompt is empty", param="messages")
        requested = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        max_tokens = ctx.resolve_max_tokens(requested, len(prompt_ids), "messages")
        num_top = body.top_logprobs or 0
        params = ctx.sampling_params(
            body, max_tokens=max_tokens, logprobs=num_top if body.logprobs else None
        )

        request_id, engine_id = request_ids(raw_request, "chatcmpl")
        ticket = ctx.admit(request_id, body, [prompt_ids], body.messages)
        streams = [
            with_deadline(
                ticket.track(
                    j, ctx.client.generate(f"{engine_id}-{j}", prompt_ids, params.for_child(j))
                ),
                deadline,
            )
            for j in range(body.n)
        ]
        if body.stream:
            return SSEResponse(self._stream(body, request_id, len(prompt_ids), streams))
        response = await until_disconnected(
            raw_request,
            self._collect(body, request_id, len(prompt_ids), streams),
            ctx.config.disconnect_poll_interval,
        )
        return JSONResponse(response.model_dump())

    def _check_unsupported(self, body: ChatCompletionRequest) -> None:
        if body.tools:
            raise BadRequest("tools are not supported yet", param="tools")
        if body.tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice is not supported yet", param="tool_choice")
        if body.response_format is not None and body.response_format.type != "text":
            raise BadRequest(
                f"response_format {body.response_format.type!r} is not supported: only 'text'",
                param="response_format",
            )
        if body.stream_options is not None and not body.stream:
            raise BadRequest(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if body.top_logprobs is not None:
            if body.top_logprobs < 0:
                raise BadRequest(
                    f"top_logprobs must be >= 0 (got {body.top_logprobs})", param="top_logprobs"
                )
            if body.top_logprobs > 0 and not body.logprobs:
                raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")

    def _logprobs(self, body: ChatCompletionRequest, out: RequestOutput) -> list[TokenLogprob]:
        if not body.logprobs or not out.new_logprobs:
            return []
        return chat_logprobs(self.ctx.strings, out.new_logprobs, body.top_logprobs or 0)

    @staticmethod
    def _usage(num_prompt_tokens: int, usages: list[ChoiceUsage]) -> UsageInfo:
        completion = sum(u.num_output_tokens for u in usages)
        return UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=completion,
            total_tokens=num_prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usages[0].num_cached_tokens),
            speculation=UsageInfo.speculation_of(
                sum(u.num_draft_tokens for u in usages),
                sum(u.num_accepted_tokens for u in usages),
            ),
        )

    # -- non-streaming -------------------------------------------------------------------------

    async def _collect(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        num_prompt_tokens: int,
        streams: list[AsyncIterator[RequestOutput]],
    ) -> ChatCompletionResponse:
        usages = [ChoiceUsage() for _ in streams]
        logprobs: list[list[TokenLogprob]] = [[] for _ in streams]
        finish: list[tuple[str | None, int | str | None]] = [(None, None) for _ in streams]
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                usages[index].update(out)
                logprobs[index] += self._logprobs(body, out)
                if out.finished:
                    finish[index] = (out.finish_reason, out.stop_reason)
        return ChatCompletionResponse(
            id=request_id,
            model=self.ctx.model_name,
            choices=[
                ChatChoice(
                    index=j,
                    message=ChatResponseMessage(content=usages[j].text),
                    logprobs=ChatLogprobs(content=logprobs[j]) if body.logprobs else None,
                    finish_reason=finish[j][0],
                    stop_reason=finish[j][1],
                )
                for j in range(len(streams))
            ],
            usage=self._usage(num_prompt_tokens, usages),
        )

    # -- streaming -----------------------------------------------------------------------------

    async def _stream(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        num_prompt_tokens: int,
        streams: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[bytes]:
        created = now()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        exclude = None if include_usage else {"usage"}
        usages = [ChoiceUsage() for _ in streams]

        def chunk(choice: ChatChunkChoice) -> bytes:
            return sse_event(
                ChatCompletionChunk(
                    id=request_id, created=created, model=self.ctx.model_name, choices=[choice]
                ),
                exclude=exclude,
            )

        try:
            for j in range(len(streams)):
                role = DeltaMessage(role="assistant", content="")
                yield chunk(ChatChunkChoice(index=j, delta=role))
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for index, out in merged:
                    usages[index].update(out)
                    lps = self._logprobs(body, out)
                    if not out.new_text and not out.finished and not lps:
                        continue
                    yield chunk(
                        ChatChunkChoice(
                            index=index,
                            delta=DeltaMessage(content=out.new_text or None),
                            logprobs=ChatLogprobs(content=lps) if body.logprobs else None,
                            finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason,
                        )
                    )
            if include_usage:
                final = ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=self.ctx.model_name,
                    choices=[],
                    usage=self._usage(num_prompt_tokens, usages),
                )
                yield sse_event(final)
        except APIError as e:
            yield sse_event(e.body())
        except InvalidParamError as e:
            yield sse_event(from_invalid_param(e).body())
        except Exception as e:
            logger.exception("chat stream %s failed", request_id, extra={"request_id": request_id})
            yield sse_event(error_body(f"Internal server error: {type(e).__name__}: {e}", 500))
        yield DONE
