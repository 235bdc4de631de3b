"""The request object: it owns its tokens, its progress and its block table.

Managers (scheduler, block manager) change it; nobody keeps a shadow copy. Invariant between
steps: ``num_computed_tokens <= len(all_token_ids)``; the tokens in
``all_token_ids[num_computed_tokens:]`` are known but their K/V is not yet in the cache (a
prompt not fully prefilled, or the last sampled token).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class Logprob:
    """The chosen token's log probability under the target model, and the top alternatives."""

    token_id: int
    logprob: float
    # (token_id, logprob), best first; len = SamplingParams.logprobs.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Tokens that end generation unless ignore_eos (the model's EOS ids).
    eos_token_ids: frozenset[int]
    # Hard cap on prompt + output tokens (max_model_len).
    max_total_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    # time.monotonic() when first scheduled (the end of its queue time); None before.
    first_scheduled_time: float | None = None

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Prompt tokens served from the prefix cache at first admission (usage.prompt_tokens_details).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Speculative decoding, over the request's life: draft tokens proposed / accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Prefix-cache hashes of this request's full blocks, in order (block manager's bookkeeping).
    block_hashes: list[int] = field(default_factory=list)
    # Prompt logprobs gathered over prefill chunks until the first output carries them;
    # None once sent (a recompute after preemption must not send them twice).
    prompt_logprobs: list[Logprob] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_output_tokens(self) -> int:
        """How many more output tokens this request may produce in total."""
        return min(self.sampling_params.max_tokens, self.max_total_tokens - self.num_prompt_tokens)

    @property
    def num_tokens_left(self) -> int:
        """Output tokens it may still produce (fewer if it stops at EOS or a stop string)."""
        return self.max_output_tokens - self.num_output_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
