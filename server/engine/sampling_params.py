"""Per-request sampling options: what the OpenAI request asked for, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Below this temperature a request is greedy (argmax), as in vLLM.
GREEDY_EPSILON = 1e-5


class InvalidParamError(ValueError):
    """A caller-supplied value is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # token id -> bias added to the logit (OpenAI clamps to [-100, 100]).
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Number of top logprobs to return per sampled token; None = no logprobs at all.
    logprobs: int | None = None
    # Logprobs of the prompt tokens (completions `echo` + `logprobs`).
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # specd extension: cap on this request's speculation budget (None = the policy decides).
    max_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "top_k must be -1 (off), 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            # Their upper bound is the server's (ServerConfig.max_logprobs, 20 by default).
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "logprobs must be >= 0"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "prompt_logprobs",
                "prompt_logprobs must be >= 0",
            ),
            (
                self.max_speculative_tokens is None or self.max_speculative_tokens >= 0,
                "speculation",
                "speculation.max_tokens must be >= 0",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidParamError(param, f"{message} (got {getattr(self, param, None)})")
        for token_id, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise InvalidParamError(
                    "logit_bias", f"bias for token {token_id} not in [-100, 100]"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )

    def for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n choices: seeds differ so choices differ (as vLLM)."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=self.seed + index)
