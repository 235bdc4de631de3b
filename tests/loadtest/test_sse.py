"""SSE framing and OpenAI streaming chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from loadtest.sse import SSEDecoder, error_message, interpret, parse_sse_text, sse_lines


def test_framing_rules() -> None:
    body = (
        ": keep-alive comment\r\n"
        'data: {"a": 1}\r\n\r\n'
        "data:no-space\n\n"
        "event: message\nid: 7\ndata: line one\ndata: line two\n\n"
        "data:  two leading spaces keep one\n\n"
        "\n\n"
        "data: [DONE]"  # no trailing blank line: flushed at end of stream
    )
    assert parse_sse_text(body) == [
        '{"a": 1}',
        "no-space",
        "line one\nline two",
        " two leading spaces keep one",
        "[DONE]",
    ]


def test_decoder_dispatches_on_blank_line_only() -> None:
    d = SSEDecoder()
    assert d.feed_line("data: x") is None
    assert d.feed_line("") == "x"
    assert d.feed_line("") is None
    assert d.flush() is None


def test_completion_chunk() -> None:
    data = {"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}
    c = interpret(json.dumps(data))
    assert (c.text, c.finish_reason, c.completion_tokens, c.error) == ("Hel", None, None, None)


def test_chat_chunks() -> None:
    role = interpret(json.dumps({"choices": [{"delta": {"role": "assistant"}}]}))
    assert role.text == ""
    content = interpret(json.dumps({"choices": [{"delta": {"content": "hi"}}]}))
    assert content.text == "hi"
    reasoning = interpret(json.dumps({"choices": [{"delta": {"reasoning_content": "hm"}}]}))
    assert reasoning.text == "hm"
    last = interpret(json.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]}))
    assert last.finish_reason == "length"


def test_usage_chunk_and_done() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    c = interpret(json.dumps(usage))
    assert (c.prompt_tokens, c.completion_tokens, c.text) == (9, 4, "")
    assert interpret("[DONE]").done


def test_errors() -> None:
    err = {"error": {"message": "max_tokens too large", "type": "BadRequestError", "code": 400}}
    assert interpret(json.dumps(err)).error == "BadRequestError: max_tokens too large"
    assert "unparseable" in (interpret("{not json").error or "")
    assert error_message({"detail": "Not Found"}) == "Not Found"
    assert error_message("plain text") == "plain text"


async def test_sse_lines_split_at_cr_and_lf_only() -> None:
    async def chunks(*parts: str) -> AsyncIterator[str]:
        for p in parts:
            yield p

    # U+2028 and U+0085 inside a JSON string are data, not line ends (httpx would split there).
    body = ('data: {"t": "a\u2028b\x85c"}\r', "\n\r\ndata: x\rdata: y\n", "\ndata: [DO", "NE]")
    lines = [line async for line in sse_lines(chunks(*body))]
    assert lines == ['data: {"t": "a\u2028b\x85c"}', "", "data: x", "data: y", "", "data: [DONE]"]


def test_parse_sse_text_keeps_unicode_line_separators_in_data() -> None:
    assert parse_sse_text('data: {"t": "a\u2028b"}\n\ndata: [DONE]\n\n') == [
        '{"t": "a\u2028b"}',
        "[DONE]",
    ]
