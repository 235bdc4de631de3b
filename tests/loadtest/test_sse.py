"""SSE framing and OpenAI streaming chunks."""

from __future__ import annotations

import json

from loadtest.sse import SSEDecoder, error_message, interpret, parse_sse_text


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
