"""Engine logprobs -> OpenAI's two logprob shapes (legacy completions and chat)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from server.api.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from server.engine.request import Logprob

# OpenAI sends this instead of -inf (not representable in JSON).
MIN_LOGPROB = -9999.0


def _clamp(x: float) -> float:
    return max(x, MIN_LOGPROB)


class TokenStrings:
    """Token id -> its text as logprobs show it, cached (the same ids recur in every top-k)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


class CompletionLogprobsBuilder:
    """Accumulates the completions shape; `text_offset` counts characters of the whole text."""

    def __init__(self, strings: TokenStrings, text_offset: int = 0) -> None:
        self._strings = strings
        self.offset = text_offset

    def build(
        self, logprobs: Sequence[Logprob | None], token_ids: Sequence[int] = ()
    ) -> CompletionLogprobs:
        """One entry per logprob. A None logprob (the first prompt token has none) takes its
        token from `token_ids` at the same position and gives None logprob entries."""
        out = CompletionLogprobs()
        for i, lp in enumerate(logprobs):
            token = self._strings.text(lp.token_id if lp is not None else token_ids[i])
            out.tokens.append(token)
            out.text_offset.append(self.offset)
            self.offset += len(token)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_clamp(lp.logprob))
            # As vLLM and OpenAI: the chosen token, then the top alternatives.
            top = {token: _clamp(lp.logprob)}
            for alt_id, alt_lp in lp.top:
                top.setdefault(self._strings.text(alt_id), _clamp(alt_lp))
            out.top_logprobs.append(top)
        return out


def chat_logprobs(
    strings: TokenStrings, logprobs: Sequence[Logprob], num_top: int
) -> list[TokenLogprob]:
    out: list[TokenLogprob] = []
    for lp in logprobs:
        token = strings.text(lp.token_id)
        top = []
        for alt_id, alt_lp in lp.top[:num_top]:
            alt = strings.text(alt_id)
            top.append(TopLogprob(token=alt, logprob=_clamp(alt_lp), bytes=list(alt.encode())))
        out.append(
            TokenLogprob(
                token=token,
                logprob=_clamp(lp.logprob),
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return out


def merge_completion_logprobs(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for p in parts:
        out.tokens += p.tokens
        out.token_logprobs += p.token_logprobs
        out.top_logprobs += p.top_logprobs
        out.text_offset += p.text_offset
    return out
