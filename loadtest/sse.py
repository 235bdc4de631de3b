"""Server-sent events (the `text/event-stream` framing) and OpenAI streaming chunks.

The framing (WHATWG HTML, "event stream interpretation"): lines end in LF, CR or CRLF; a line
starting with ':' is a comment; `field: value` with one optional space after the colon; several
`data` lines in one event are joined with LF; a blank line dispatches the event. OpenAI servers
send one JSON object per event and finish with `data: [DONE]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


class SSEDecoder:
    """Feed it lines (without their terminator); it returns each event's data when dispatched."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        # `event`, `id`, `retry`: OpenAI-compatible servers do not use them for completions.
        return None

    def flush(self) -> str | None:
        """Dispatch a pending event (end of stream without a trailing blank line)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """A body's lines, split at CR, LF or CRLF only, as SSE defines them. httpx's
    aiter_lines splits like str.splitlines, at U+2028, U+0085 and others too: a model may
    generate those and a JSON encoder need not escape them, so a chunk would break in two."""
    buf = ""
    async for text in chunks:
        buf += text
        # A CR at the end may be half of a CRLF split between reads: keep it for the next.
        held = "\r" if buf.endswith("\r") else ""
        *lines, buf = _LINE_END.split(buf[: len(buf) - len(held)])
        buf += held
        for line in lines:
            yield line
    if buf:
        yield buf.rstrip("\r")


def parse_sse_text(text: str) -> list[str]:
    """Every event's data in a complete event-stream body, in order."""
    return parse_sse_lines(_LINE_END.split(text))


def parse_sse_lines(lines: Iterable[str]) -> list[str]:
    """Every event's data in a sequence of lines (terminators stripped or not), in order."""
    decoder = SSEDecoder()
    out = [d for line in lines if (d := decoder.feed_line(line)) is not None]
    if (last := decoder.flush()) is not None:
        out.append(last)
    return out


@dataclass(frozen=True)
class Chunk:
    """What one streamed OpenAI chunk tells a benchmark."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    done: bool = False


def interpret(data: str) -> Chunk:
    """One event's data from /v1/completions or /v1/chat/completions as a Chunk.

    Text is `choices[0].text` (completions) or `choices[0].delta.content` (chat, with
    `reasoning_content` counted as output too). Usage arrives in its own final chunk with
    `choices: []` when the request set stream_options.include_usage. An `error` object
    mid-stream (vLLM sends one when generation fails after the 200) becomes Chunk.error.
    """
    if data.strip() == DONE:
        return Chunk(done=True)
    try:
        obj: Any = json.loads(data)
    except json.JSONDecodeError as e:
        return Chunk(error=f"unparseable SSE data ({e}): {data[:200]!r}")
    if not isinstance(obj, dict):
        return Chunk(error=f"SSE data is not a JSON object: {data[:200]!r}")
    if obj.get("error"):
        return Chunk(error=error_message(obj))
    text = ""
    finish = None
    choices = obj.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text = choice.get("text") or ""
        finish = choice.get("finish_reason")
    usage = obj.get("usage") or {}
    return Chunk(
        text=text,
        finish_reason=finish,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
    )


def error_message(body: Any) -> str:
    """The human part of an OpenAI error object (or of whatever else came back)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:500]
            kind = err.get("type") or err.get("code")
            return f"{kind}: {msg}" if kind else str(msg)
        if isinstance(err, str):
            return err
    return str(body)[:500]
