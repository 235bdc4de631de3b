"""What the engine tells the API about a request: one RequestOutput per step that changed it.

These are the messages that cross the engine-core / API boundary (pickled over a pipe when the
core runs in its own process), and then, after detokenisation in the API process, what
``EngineClient.generate`` yields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import Logprob


@dataclass
class EngineCoreOutput:
    """One step's news for one request, as the engine core sends it (token ids only)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob] | None = None
    # Prompt logprobs, all at once, in the first output of a request that asked for them.
    prompt_logprobs: list[Logprob | None] | None = None
    # "stop" | "length" | "abort" | None while running.
    finish_reason: str | None = None
    # The stop token id that ended it (OpenAI's stop_reason extension, as vLLM), if any.
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Speculative decoding (usage extension): draft tokens proposed / accepted so far.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Set when the engine could not run this request (finish_reason "abort"): the API answers 500.
    error: str | None = None
    # time.monotonic() when the engine first scheduled it (the same clock in every process).
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the API consumes: a delta of tokens *and text* since the previous RequestOutput."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Total output tokens so far (after stop-string truncation): usage.completion_tokens.
    num_output_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # The text of every token so far, for non-streaming bodies.
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
