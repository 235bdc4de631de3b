"""What the completion, chat and tokenize routes share: model-name and context checks,
tokenisation, SamplingParams from a request, stream merging and disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
from starlette.requests import Request

from server.api.admission import AdmissionQueue, Ticket
from server.api.drain import DrainState
from server.api.errors import CLIENT_CLOSED, APIError, BadRequest
from server.api.logprobs import TokenStrings
from server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    TokenizeRequest,
)
from server.config import ServerConfig
from server.engine.client import AsyncEngineClient, EngineDeadError
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import InvalidParamError, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# chat_template_kwargs may not override what the endpoint itself passes.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tokenize", "add_generation_prompt", "continue_final_message", "tools"}
)


class Draining(APIError):
    """503 while the server drains before it stops: retry on another replica."""

    reason = "draining"

    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down; retry on another replica", status=503, code="draining"
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# A client's X-Request-Id is taken as the request's id when it is this tame (it goes into
# logs and the response body); anything else gets an id of our own.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_ids(raw_request: Request, prefix: str) -> tuple[str, str]:
    """(the request's id, the prefix of its engine requests' ids). The id is the client's
    X-Request-Id when it sent a tame one (as vLLM), else a random one. Engine ids get a nonce
    after a client's id: two requests may share an X-Request-Id, engine ids must differ."""
    given = raw_request.headers.get("x-request-id", "")
    if _CLIENT_ID.match(given):
        return given, f"{given}-{uuid.uuid4().hex[:8]}"
    request_id = random_id(prefix)
    return request_id, request_id


@dataclass
class ChoiceUsage:
    """The latest counters of one choice's engine request (RequestOutput is cumulative here)."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    texts: list[str] = field(default_factory=list)

    def update(self, out: RequestOutput) -> None:
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(out.num_cached_tokens, self.num_cached_tokens)
        self.num_output_tokens = out.num_output_tokens
        self.num_draft_tokens = max(out.num_draft_tokens, self.num_draft_tokens)
        self.num_accepted_tokens = max(out.num_accepted_tokens, self.num_accepted_tokens)
        if out.new_text:
            self.texts.append(out.new_text)

    @property
    def text(self) -> str:
        return "".join(self.texts)


class ServingContext:
    """The engine client and server config, plus helpers every route needs."""

    def __init__(
        self, client: AsyncEngineClient, server_config: ServerConfig, drain: DrainState
    ) -> None:
        self.client = client
        self.drain = drain
        self.config = server_config
        self.tokenizer = client.tokenizer
        self.strings = TokenStrings(client.tokenizer)
        self.admission = AdmissionQueue(
            server_config.max_num_queued_reqs, server_config.max_num_queued_tokens
        )

    @property
    def model_name(self) -> str:
        return self.client.model_name

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    # -- checks --------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """First thing in a generation route: 503 if the engine is down or the queue is full.
        Before any tokenising or template rendering, so refusing costs next to nothing."""
        if not self.client.is_healthy():
            raise APIError("The engine is not running", status=503, code="engine_unavailable")
        if self.drain.draining:
            raise Draining()
        self.admission.check()

    def admit(
        self,
        request_id: str,
        req: SamplingFields,
        prompts: Sequence[Sequence[int]],
        prompt_text: object = None,
    ) -> Ticket:
        """Queues the request's n choices per prompt (see admission.py) and logs it: its id and
        sizes always, its prompt only with --log-prompts (prompts are user data)."""
        ticket = self.admission.admit([len(p) for p in prompts for _ in range(req.n)])
        logger.info(
            "request %s: %d prompt(s), %d prompt tokens, n=%d, max_tokens=%s, stream=%s%s",
            request_id,
            len(prompts),
            sum(len(p) for p in prompts),
            req.n,
            getattr(req, "max_tokens", None),
            req.stream,
            f", prompt={prompt_text!r}" if self.config.log_prompts else "",
            extra={"request_id": request_id},
        )
        return ticket

    def deadline(self, req: SamplingFields) -> float | None:
        """The event-loop time by which the request must finish (None: no limit)."""
        limits = [t for t in (self.config.request_timeout_s, req.timeout) if t is not None]
        if not limits:
            return None
        return asyncio.get_running_loop().time() + min(limits)

    def check_limits(self, req: SamplingFields, num_prompts: int = 1) -> None:
        """The per-request limits of the server config (400, code "limit_exceeded")."""
        cfg = self.config

        def limit(param: str, what: str, value: int, most: int) -> None:
            if value > most:
                raise BadRequest(
                    f"{what} must be at most {most} (got {value})",
                    param=param,
                    code="limit_exceeded",
                )

        limit("n", "n", req.n, cfg.max_n)
        limit("n", "n x the number of prompts", req.n * num_prompts, cfg.max_n)
        if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None:
            limit("top_logprobs", "top_logprobs", req.top_logprobs, cfg.max_logprobs)
        if isinstance(req, CompletionRequest) and req.logprobs is not None:
            limit("logprobs", "logprobs", req.logprobs, cfg.max_logprobs)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        limit("stop", "The number of stop strings", len(stops), cfg.max_stop_strings)
        longest = max((len(s) for s in stops), default=0)
        limit("stop", "A stop string's length in characters", longest, cfg.max_stop_string_chars)
        limit(
            "logit_bias",
            "The number of logit_bias entries",
            len(req.logit_bias or {}),
            cfg.max_logit_bias_entries,
        )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab = self.client.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(
                f"Token id {bad} is out of vocabulary (valid ids are 0..{vocab - 1})", param=param
            )

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int, param: str) -> int:
        """max_tokens checked against the context; None = whatever context remains."""
        limit = self.max_model_len
        if requested is not None and requested < 1:
            raise BadRequest(f"max_tokens must be at least 1 (got {requested})", param="max_tokens")
        wanted = requested if requested is not None else max(limit - num_prompt_tokens, 1)
        if num_prompt_tokens + wanted > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in the {param}, "
                f"{wanted} in the completion). Please reduce the length of the {param} or "
                "completion.",
                param=param,
                code="context_length_exceeded",
            )
        return wanted

    # -- tokenisation --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> str:
        if not messages:
            raise BadRequest("messages must contain at least one message", param="messages")
        if add_generation_prompt and continue_final_message:
            raise BadRequest(
                "continue_final_message continues the last message; "
                "set add_generation_prompt to false with it",
                param="continue_final_message",
            )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise BadRequest(
                f"The model `{self.model_name}` has no chat template; use /v1/completions"
            )
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise BadRequest(
                f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs"
            )
        conversation = [_template_message(i, m) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise BadRequest(
                f"The chat template rejected the messages: {e}", param="messages"
            ) from e
        assert isinstance(text, str), type(text)
        return text

    def chat_prompt_ids(self, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
        """The token ids of a request's messages rendered with the model's chat template."""
        assert body.messages is not None
        text = self.render_chat(
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
        )
        return self.encode_chat(text)

    def encode_chat(self, text: str) -> list[int]:
        # The template already wrote BOS (and every other special token) where the model wants
        # them; adding special tokens again would double the BOS.
        return self.encode(text, add_special_tokens=False)

    # -- sampling ------------------------------------------------------------------------------

    def sampling_params(
        self,
        req: SamplingFields,
        *,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        stop_token_ids = tuple(req.stop_token_ids or ())
        self.check_token_ids(stop_token_ids, "stop_token_ids")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                seed=req.seed,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=(
                    1.0 if req.repetition_penalty is None else req.repetition_penalty
                ),
                logit_bias=self._logit_bias(req.logit_bias),
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
                max_speculative_tokens=req.speculation.max_tokens if req.speculation else None,
            )
        except InvalidParamError as e:
            raise BadRequest(str(e), param=e.param) from e

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise BadRequest(
                    f"logit_bias keys must be token ids (got {key!r})", param="logit_bias"
                ) from None
            self.check_token_ids([token_id], "logit_bias")
            out[token_id] = value
        return out


def _check_message(index: int, message: ChatMessage) -> None:
    """OpenAI's rules on a message's parts per role (it answers 400 to each of these)."""
    where = f"messages[{index}]"
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        needs = "content or tool_calls" if message.role == "assistant" else "content"
        raise BadRequest(
            f"A message with role '{message.role}' must have {needs}", param=f"{where}.content"
        )
    if isinstance(message.content, list) and not message.content:
        raise BadRequest("content must not be an empty list", param=f"{where}.content")
    if message.role == "tool" and not message.tool_call_id:
        raise BadRequest(
            "A message with role 'tool' must have a tool_call_id", param=f"{where}.tool_call_id"
        )
    if message.tool_calls is not None and message.role != "assistant":
        raise BadRequest("Only assistant messages may have tool_calls", param=f"{where}.tool_calls")


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    _check_message(index, message)
    if message.content is None or isinstance(message.content, str):
        content = message.content or ""
    else:
        texts = []
        for j, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                raise BadRequest(
                    f"Content part type {part.type!r} is not supported: only 'text' parts are",
                    param=f"messages[{index}].content[{j}]",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    # Most templates know "system" but not OpenAI's newer "developer".
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": content,
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    return out


# ---------------------------------------------------------------------------------------------
# Streams


async def merge_streams(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several engine streams as they arrive.

    Whatever ends this generator early (the consumer closing it, cancellation, an error in one
    stream) closes every engine stream, which aborts its request in the engine. The engine
    process dying mid-request is a 503: nothing is wrong with the request.
    """
    try:
        async for item in _merge(streams):
            yield item
    except EngineDeadError as e:
        raise APIError(
            f"The engine stopped while serving this request: {e}",
            status=503,
            code="engine_unavailable",
        ) from e


async def _merge(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for out in stream:
                yield 0, _checked(out)
        finally:
            await _aclose(stream)
        return

    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, _checked(out)))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            await _aclose(stream)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def with_deadline(stream: AsyncIterator[T], deadline: float | None) -> AsyncIterator[T]:
    """``stream`` until ``deadline`` (event-loop time), then a 408: the wait for the next item
    is cancelled, which closes the engine stream and so aborts the request. Without a deadline
    the stream itself: no extra generator hop per token."""
    return stream if deadline is None else _until_deadline(stream, deadline)


async def _until_deadline(stream: AsyncIterator[T], deadline: float) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    iterator = aiter(stream)
    try:
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                item = await asyncio.wait_for(anext(iterator), remaining)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise APIError(
                    "The request did not finish within its timeout", status=408, code="timeout"
                ) from None
            yield item
    finally:
        await _aclose(iterator)


def _checked(out: RequestOutput) -> RequestOutput:
    if out.error is not None:
        # The engine refused or failed this request; the API checks should have caught the
        # refusals first, so this is the server's fault: 500.
        raise APIError(f"The engine could not run the request: {out.error}", status=500)
    return out


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def until_disconnected(raw_request: Request, work: Awaitable[T], poll_s: float) -> T:
    """Runs `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await raw_request.is_disconnected():
                raise APIError("Client disconnected", status=CLIENT_CLOSED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
