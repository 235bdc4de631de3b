"""The shipped prompt sets and the dataset loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.data import DATASET_DIR, load_jsonl, load_samples, random_prompt
from loadtest.tokens import ApproxCounter

COUNTER = ApproxCounter()


def test_shipped_sets_are_big_enough_and_varied() -> None:
    rep = load_jsonl(DATASET_DIR / "repetitive.jsonl")
    chat = load_jsonl(DATASET_DIR / "chat.jsonl")
    assert len(rep) >= 30 and len(chat) >= 30
    cats = {r["category"] for r in rep}
    assert {"code-rename", "json-to-yaml", "quoting-summary", "extraction"} <= cats
    assert len({r["prompt"] for r in rep + chat}) == len(rep) + len(chat)


def test_repetitive_prompts_hold_their_source() -> None:
    """Every repetitive prompt carries the material the answer copies (a code block, a JSON
    document or a quoted text): that is what makes prompt lookup pay off."""
    for r in load_jsonl(DATASET_DIR / "repetitive.jsonl"):
        assert COUNTER.count(r["prompt"]) >= 40, r["prompt"][:80]


def test_counts_seeds_and_output_len() -> None:
    a = load_samples("mix", 100, COUNTER, seed=1, output_len=32)
    b = load_samples("mix", 100, COUNTER, seed=1, output_len=32)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert len(a) == 100 and {s.output_len for s in a} == {32}
    cats = {s.category.split("-")[0] for s in a}
    assert "chat" in cats and len(cats) > 2
    assert load_samples("chat", 3, COUNTER)[0].output_len == 128


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_random_prompt_length_is_exact_under_its_counter(n: int) -> None:
    words = (DATASET_DIR / "words.txt").read_text().split()
    text = random_prompt(n, COUNTER, np.random.default_rng(0), words)
    assert COUNTER.count(text) == n


def test_random_dataset_range_ratio() -> None:
    s = load_samples(
        "random", 50, COUNTER, random_input_len=40, random_output_len=20, random_range_ratio=0.5
    )
    assert all(20 <= x.prompt_len <= 60 and 10 <= x.output_len <= 30 for x in s)
    assert len({x.prompt_len for x in s}) > 5


def test_sharegpt(tmp_path: Path) -> None:
    convs = [
        {"id": "a", "conversations": [
            {"from": "human", "value": "Tell me about the history of the bicycle please."},
            {"from": "gpt", "value": "Bicycles appeared in the early nineteenth century as "
                                     "wooden running machines without pedals."}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi"},
                                          {"from": "gpt", "value": "hello"}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": "alone"}]},
    ]  # fmt: skip
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    s = load_samples("sharegpt", 3, COUNTER, dataset_path=str(path))
    assert len(s) == 3 and {x.prompt for x in s} == {convs[0]["conversations"][0]["value"]}
    assert s[0].output_len == COUNTER.count(convs[0]["conversations"][1]["value"])
    with pytest.raises(ValueError, match="dataset-path"):
        load_samples("sharegpt", 3, COUNTER)


def test_custom_jsonl_and_bad_name(tmp_path: Path) -> None:
    p = tmp_path / "mine.jsonl"
    p.write_text('{"prompt": "one two three", "output_len": 5}\n\n')
    (s,) = load_samples("repetitive", 1, COUNTER, dataset_path=str(p))
    assert (s.prompt, s.output_len) == ("one two three", 5)
    with pytest.raises(ValueError, match="dataset-name"):
        load_samples("nope", 1, COUNTER)
