"""Incremental detokenisation with stop strings, one object per request (API process).

Text comes from the offset method of TGI / vLLM: keep two offsets into the token list,
``prefix_offset <= read_offset``; for each new token decode ``ids[prefix_offset:]`` and
``ids[prefix_offset:read_offset]`` and emit the difference. A few trailing tokens of context keep
tokenizers that drop a leading space (SentencePiece) right, and a difference that ends in U+FFFD
means a multi-byte character is still incomplete: it is held until the next token completes it.
Each token costs two decodes of a window of a few tokens, so an update is O(new tokens).

Stop strings (OpenAI semantics): the output ends at the first occurrence of any stop string (the
earliest position wins); the stop string itself is cut from the text unless
``include_stop_str_in_output``; tokens after the one that completed it are dropped and do not
count as completion tokens. While streaming, a suffix of the text that could be the start of a
stop string is held back, so a stop string never leaks into streamed text; ``flush`` (or
``update(..., finished=True)``) releases it when the request ends some other way.

Invariant: ``text == "".join(u.new_text for u in updates)``, and when the request ends without
a stop string, ``text == tokenizer.decode(output_ids, skip_special_tokens=...)`` for tokenizers
whose decode is a concatenation (byte-level BPE such as SmolLM2, Llama 3, Qwen).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.sampling_params import SamplingParams

# Prompt tokens used as decoding context for the first output tokens (as vLLM).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    """The part of a transformers tokenizer the detokenizer uses."""

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = ...,
        clean_up_tokenization_spaces: bool | None = ...,
    ) -> str: ...


@dataclass
class DetokenizerUpdate:
    # Text to send to the client now (may be "" while a character or stop prefix is held).
    new_text: str
    # How many of the tokens passed to this update count as output (all of them unless a stop
    # string was completed, then the ones up to and including the completing token).
    num_new_tokens_kept: int
    # The stop string that ended the request this update, or None.
    stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas, applying its stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = tuple(s for s in params.stop if s)
        self._include_stop = params.include_stop_str_in_output
        context = list(prompt_token_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        # Token window for decoding: prompt context + every output token seen so far.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Emitted text pieces, and decoded text not yet emitted (held back for stop strings).
        self._chunks: list[str] = []
        self._pending = ""
        self._num_tokens = 0
        self._stop_string: str | None = None
        self._finished = False

    # ---- public state ------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All text emitted so far (final once finished: after a stop or ``flush``)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_tokens(self) -> int:
        """Output tokens kept so far (usage.completion_tokens)."""
        return self._num_tokens

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    @property
    def finished(self) -> bool:
        return self._finished

    # ---- updates -----------------------------------------------------------------------

    def update(self, new_token_ids: Sequence[int], finished: bool = False) -> DetokenizerUpdate:
        """Consume new output tokens; ``finished`` = the engine ended the request this step.

        Once a stop string has matched (or after ``finished``), further tokens are ignored.
        """
        if self._finished:
            return DetokenizerUpdate("", 0, None)
        kept = 0
        for token_id in new_token_ids:
            kept += 1
            self._num_tokens += 1
            start = len(self._pending)
            self._pending += self._decode_next(token_id)
            if self._stops and self._check_stop(start):
                return DetokenizerUpdate(self._emit(final=True), kept, self._stop_string)
        if finished:
            return DetokenizerUpdate(self.flush().new_text, kept, None)
        return DetokenizerUpdate(self._emit(final=False), kept, None)

    def flush(self) -> DetokenizerUpdate:
        """End without a stop string: emit incomplete-character bytes and held-back text."""
        if self._finished:
            return DetokenizerUpdate("", 0, None)
        start = len(self._pending)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._pending += full_text[len(prefix_text) :]
        self._read_offset = len(self._ids)
        # The flushed bytes (U+FFFD) could still complete a stop string.
        if self._stops and self._check_stop(start):
            return DetokenizerUpdate(self._emit(final=True), 0, self._stop_string)
        return DetokenizerUpdate(self._emit(final=True), 0, None)

    # ---- internals ---------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _decode_next(self, token_id: int) -> str:
        """Append one token; return the newly completed text ("" while a char is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def _check_stop(self, start: int) -> bool:
        """Search pending text for a stop string completed by text appended at ``start``.

        Truncates pending text and records the stop string when found. Only pending text is
        searched: emitted text never holds the beginning of a stop string (see ``_held``).
        """
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._pending.find(stop, max(0, start - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        end = index + len(stop) if self._include_stop else index
        self._pending = self._pending[:end]
        self._stop_string = stop
        return True

    def _held(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop."""
        held = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), held, -1):
                if self._pending.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _emit(self, final: bool) -> str:
        cut = len(self._pending) if final else len(self._pending) - self._held()
        out, self._pending = self._pending[:cut], self._pending[cut:]
        if out:
            self._chunks.append(out)
        if final:
            self._finished = True
        return out
