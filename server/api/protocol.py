"""OpenAI request and response bodies (plus vLLM's extras and specd's `speculation`).

Numbers and booleans are strict: OpenAI answers 400 to `"max_tokens": "5"` or `"n": true`, and
so do we (pydantic's lax mode would quietly coerce them). Integers must fit in 64 bits and
floats must be finite (Python's JSON parser reads 10**30, NaN and Infinity, which torch and the
sampler cannot take), and no string may hold a lone UTF-16 surrogate ("\ud800" is valid JSON
but not Unicode the tokenizer can encode). Unknown fields are ignored, as vLLM does, so newer
clients keep working.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int = Annotated[int, Strict(), Interval(ge=INT64_MIN, le=INT64_MAX)]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
TokenIds = list[Int]

# Roles the chat endpoint accepts. "developer" is OpenAI's new name for "system".
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def lone_surrogate_at(value: Any) -> str | None:
    """Where in a parsed JSON value a string (or key) holds a lone surrogate, as
    'messages[0].content', or None. Iterative: the parser's nesting limit is the only one."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    # The path itself may hold the bad key: escape it to be printable.
                    return path.encode("utf-8", "backslashreplace").decode() or None
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                stack.append((where, key))
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


class RequestBody(OpenAIModel):
    """A top-level request body: refuses strings that are not valid Unicode, naming where."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param} is not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)",
                {"param": where},
            )
        return data


# ---------------------------------------------------------------------------------------------
# Request pieces


class StreamOptions(OpenAIModel):
    include_usage: Bool = False


class SpeculationOptions(OpenAIModel):
    """specd extension: cap this request's speculation budget (0 = never speculate)."""

    max_tokens: Int | None = None


class SamplingFields(RequestBody):
    """Fields shared by both generation endpoints (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    # Its upper bound is the server's max_n (ServerConfig), checked in the route.
    n: Annotated[int, Strict(), Interval(ge=1, le=INT64_MAX)] = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    # Token id (as a string, as JSON keys are) -> bias in [-100, 100].
    logit_bias: dict[str, Float] | None = None
    user: str | None = None
    # vLLM extras.
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    ignore_eos: Bool = False
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    # specd extensions.
    speculation: SpeculationOptions | None = None
    # Seconds this request may take, queueing included, before it is aborted with a 408 (a
    # stream ends with an error event). Only shortens the server's --request-timeout.
    timeout: Annotated[float, Strict(), Interval(gt=0)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]; checked by `_prompt_shape` for one clear
    # message instead of pydantic's four union-member errors.
    prompt: Any = Field(...)
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> str | list[str] | list[int] | list[list[int]]:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        ok = (
            isinstance(v, str)
            or (isinstance(v, list) and all(isinstance(p, str) for p in v))
            or is_ids(v)
            or (isinstance(v, list) and all(is_ids(p) for p in v))
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of lists of token ids"
            )
        return v


class TextContentPart(OpenAIModel):
    # Only "text" is served; other types are answered with a 400 naming the type.
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: ChatRole
    # Required except on assistant messages that carry tool_calls (checked in serving.py).
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None


class ResponseFormat(OpenAIModel):
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Bool | None = None
    # vLLM extras for the chat template.
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: either a `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: TokenIds


# ---------------------------------------------------------------------------------------------
# Responses


def now() -> int:
    return int(time.time())


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class SpeculationUsage(OpenAIModel):
    """specd extension: how speculative decoding went for this request."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # null when no draft token was proposed for the request.
    speculation: SpeculationUsage | None = None

    @staticmethod
    def speculation_of(draft_tokens: int, accepted_tokens: int) -> SpeculationUsage | None:
        if draft_tokens == 0:
            return None
        return SpeculationUsage(
            draft_tokens=draft_tokens,
            accepted_tokens=accepted_tokens,
            acceptance_rate=round(accepted_tokens / draft_tokens, 4),
        )


class CompletionLogprobs(OpenAIModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM extension: the stop string or token id that ended the choice.
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    # OpenAI's deltas carry only what changed: {"content": "x"}, not {"role": null, ...}.
    @field_serializer("delta")
    def _delta_without_nulls(self, delta: DeltaMessage) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "specd"
    root: str | None = None
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str
