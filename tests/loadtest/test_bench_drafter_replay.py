"""bench_drafter_replay: greedy verification's accepted path, the replay's scenarios and what
each drafter learns on the way, and the report (recorded answers made by hand: no model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.bench_drafter_replay import (
    Recording,
    Score,
    accepted_path,
    drafter_factory,
    replay,
    score,
    write_report,
)
from server.spec_decode.tree import TokenTree

V = 64


def recording(prompt: list[int], answer: list[int], k: int = 8) -> Recording:
    """Top-k rows that put each next answer token first, so recycle can learn them."""
    ids = np.zeros((len(answer), k), dtype=np.int64)
    probs = np.zeros((len(answer), k), dtype=np.float32)
    for i, token in enumerate(answer):
        ids[i] = [token] + [(token + j) % V for j in range(1, k)]
        probs[i] = [0.9] + [0.1 / (k - 1)] * (k - 1)
    return Recording(prompt, answer, ids, probs)


def test_accepted_path_follows_the_answer_down_the_tree() -> None:
    # 0 -> 5 -> 6 -> 7, and 0 -> 5 -> 8; 0 -> 9
    tree = TokenTree((0, 5, 6, 7, 8, 9), (-1, 0, 1, 2, 1, 0))
    assert accepted_path(tree, [5, 8, 1]) == (1, 4)
    assert accepted_path(tree, [5, 6, 7, 7]) == (1, 2, 3)
    assert accepted_path(tree, [9]) == (5,)
    assert accepted_path(tree, [4, 5]) == ()
    assert accepted_path(TokenTree.root_only(0), [1]) == ()


def test_ngram_drafts_what_the_answer_copies_from_the_prompt() -> None:
    span = [11, 12, 13, 14, 15, 16]
    copied = recording([1, 2, *span, 3], span)
    fresh = recording([1, 2, 3], [40, 41, 42, 43, 44, 45])
    outcomes = replay(drafter_factory("ngram", V)(), [copied, fresh], budget=4)
    assert len(outcomes) == 12  # both requests, every position
    # Request 0's positions come first in each step: (r0, r1) per position.
    copied_accepted = [a for a, _, _ in outcomes[0::2]]
    fresh_accepted = [a for a, _, _ in outcomes[1::2]]
    assert sum(copied_accepted) > 0 and sum(fresh_accepted) == 0
    s = score("d", "fresh", "ngram", outcomes)
    assert s.positions == 12 and 0 < s.any_accepted < 1


def test_a_repeat_is_drafted_from_the_suffix_cache() -> None:
    answer = [20, 31, 22, 43, 24, 35, 26, 47]
    rec = recording([1, 2, 3], answer)
    fresh = replay(drafter_factory("suffix", V)(), [rec], budget=8)
    repeat = replay(drafter_factory("suffix", V)(), [rec], budget=8, earlier=[rec])
    assert sum(a for a, _, _ in fresh) == 0
    # Every position drafts the rest of the answer (up to the budget) from the cache.
    assert [a for a, _, _ in repeat] == [len(answer) - i for i in range(len(answer))]


@pytest.mark.parametrize("method", ["recycle", "recycle/shared"])
def test_drafters_that_learn_the_targets_top_k_are_fed_it(method: str) -> None:
    # Recycle learns "after 7 comes 8" from the top-k row of the first 7 (its table starts from
    # the prompt alone), then drafts it.
    answer = [7, 8, 9, 7, 8, 9, 7, 8, 9]
    outcomes = replay(drafter_factory(method, V)(), [recording([1, 2], answer)], budget=2)
    assert sum(a for a, _, _ in outcomes[3:]) > 0


def test_report_files(tmp_path: Path) -> None:
    scores = [
        Score("repetitive", scenario, method, 100, accepted, 0.5, 7.5, 4.0)
        for scenario in ("fresh", "repeat")
        for method, accepted in (("ngram", 1.2), ("auto", 2.5))
    ]
    args = argparse.Namespace(out=tmp_path, name="t", budget=8)
    write_report(args, scores)
    table = (tmp_path / "t.md").read_text()
    assert "| repetitive | repeat | auto | 100 | 2.50 | 0.50 | 7.5 | 4.0 |" in table
    assert json.loads((tmp_path / "t.json").read_text())["scores"][1]["method"] == "auto"
    assert (tmp_path / "t.png").stat().st_size > 0
