"""Model-free drafters: n-gram prompt lookup (chains) and the suffix-match tree drafter."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.spec_decode.drafter import Drafter
from server.spec_decode.drafters import available_drafters, make_drafter
from server.spec_decode.history import TokenHistory, continuation, suffix_matches
from server.spec_decode.ngram import NgramDrafter
from server.spec_decode.suffix_tree import SuffixTreeDrafter
from server.spec_decode.tree import TokenTree

_ids = itertools.count()


def make_request(prompt: list[int], output: list[int] | None = None) -> Request:
    r = Request(
        request_id=f"r{next(_ids)}",
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(),
        eos_token_ids=frozenset(),
        max_total_tokens=1_000_000,
    )
    for t in output or []:
        r.append_output_token(t)
    return r


def paths_of(tree: TokenTree) -> set[tuple[int, ...]]:
    """Root-to-leaf draft token paths of a tree."""
    leaves = [i for i in range(tree.num_nodes) if not tree.children[i] and i > 0]
    return {tuple(tree.token_ids[j] for j in tree.path_to(leaf)[1:]) for leaf in leaves}


# ---------------------------------------------------------------------------------------------
# Shared matching helpers
# ---------------------------------------------------------------------------------------------


def test_suffix_matches_lengths() -> None:
    tokens = np.array([1, 2, 3, 9, 2, 3, 5, 1, 2, 3], dtype=np.int64)
    ends, lengths = suffix_matches(tokens, max_match=4)
    # Token 3 occurs earlier at 2 (preceded by 1 2 -> matches "1 2 3") and 5 ("2 3" only).
    assert ends.tolist() == [2, 5]
    assert lengths.tolist() == [3, 2]
    ends, lengths = suffix_matches(tokens, max_match=2)
    assert lengths.tolist() == [2, 2]
    assert suffix_matches(np.array([4], dtype=np.int64), 3)[0].size == 0


def test_continuation_repeats_past_the_end() -> None:
    tokens = np.array([7, 8, 7, 8, 7], dtype=np.int64)
    # Most recent 7 before the end is at 2: "8 7" follows, then the pattern repeats.
    assert continuation(tokens, 2, 5) == [8, 7, 8, 7, 8]
    assert continuation(tokens, 0, 3) == [8, 7, 8]


def test_token_history_is_incremental_and_released() -> None:
    h = TokenHistory()
    r = make_request([1, 2, 3])
    assert h.tokens(r).tolist() == [1, 2, 3]
    for t in range(200):
        r.append_output_token(t)
    assert h.tokens(r).tolist() == r.all_token_ids
    assert len(h) == 1
    h.release([r.request_id, "unknown"])
    assert len(h) == 0


def test_token_history_matches_each_context_once_and_answers_shallower_matchings() -> None:
    """A shared history (``auto``'s sources) suffix-matches a context once: a matching at up to
    8 tokens answers one at up to 4 (lengths capped) as computing it anew would, a new token
    means a new matching, and a request whose tokens were replaced is matched afresh."""
    rng = np.random.default_rng(0)
    h = TokenHistory()
    r = make_request(rng.integers(0, 5, 300).tolist())
    for _ in range(20):
        deep = h.matches(r, 8)
        assert h.matches(r, 8)[1] is deep[1]  # not matched again
        tokens = np.array(r.all_token_ids, dtype=np.int64)
        for m in (8, 4, 2):
            _, ends, lengths = h.matches(r, m)
            want = suffix_matches(tokens, m)
            assert ends.tolist() == want[0].tolist() and lengths.tolist() == want[1].tolist()
        r.append_output_token(int(rng.integers(0, 5)))
    other = make_request([1, 2, 1, 2, 1])
    other.request_id = r.request_id  # the same id, another context
    _, ends, lengths = h.matches(other, 4)
    want = suffix_matches(np.array([1, 2, 1, 2, 1], dtype=np.int64), 4)
    assert ends.tolist() == want[0].tolist() and lengths.tolist() == want[1].tolist()


# ---------------------------------------------------------------------------------------------
# n-gram
# ---------------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_recent_match() -> None:
    d = NgramDrafter(prompt_lookup_min=1, prompt_lookup_max=3)
    # "5 6" occurs twice; the longest suffix match "4 5 6" only at the start: follow it.
    r = make_request([4, 5, 6, 10, 11, 12, 5, 6, 20, 21, 9, 4, 5, 6])
    (tree,) = d.propose([r], [3])
    assert tree.is_chain and tree.root_token == 6
    assert tree.draft_token_ids == [10, 11, 12]
    # Budget caps the chain; 0 means plain decode.
    assert d.propose([r], [2])[0].draft_token_ids == [10, 11]
    assert d.propose([r], [0])[0] == TokenTree.root_only(6)


def test_ngram_picks_most_recent_occurrence_and_respects_min() -> None:
    d = NgramDrafter(prompt_lookup_min=1, prompt_lookup_max=2)
    r = make_request([1, 2, 3, 9, 2, 4, 9, 2])
    # "9 2" occurs twice; the more recent one was followed by 4.
    assert d.propose([r], [2])[0].draft_token_ids == [4, 9]
    strict = NgramDrafter(prompt_lookup_min=3, prompt_lookup_max=4)
    assert strict.propose([r], [4])[0].num_drafts == 0  # no 3-token match
    no_match = make_request([1, 2, 3, 4])
    assert d.propose([no_match], [4])[0] == TokenTree.root_only(4)


def test_ngram_uses_generated_tokens_and_extends_periodic_text() -> None:
    d = NgramDrafter()
    r = make_request([3, 1], output=[2, 1, 2, 1])
    # Context "3 1 2 1 2 1": the pattern "1 2" repeats; 6 drafts continue it.
    assert d.propose([r], [6])[0].draft_token_ids == [2, 1, 2, 1, 2, 1]
    r.append_output_token(7)
    assert d.propose([r], [3])[0].num_drafts == 0  # 7 is new
    d.release([r.request_id])


def test_ngram_long_context_is_fast() -> None:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50_000, size=32_000).tolist()
    r = make_request([*prompt[:1000], *prompt, *prompt[:50]])
    d = NgramDrafter()
    d.propose([r], [4])  # converts the history once
    start = time.perf_counter()
    for i in range(20):
        r.append_output_token(prompt[50 + i])
        tree = d.propose([r], [4])[0]
    per_call = (time.perf_counter() - start) / 20
    # The context now ends with prompt[:70] (the longest, most recent match).
    assert tree.draft_token_ids == prompt[70:74]
    assert per_call < 0.005, per_call  # ~0.1 ms measured; generous for shared cores


# ---------------------------------------------------------------------------------------------
# Suffix tree
# ---------------------------------------------------------------------------------------------


def test_suffix_tree_branches_on_repetitive_text() -> None:
    # "A B" was followed by C (twice) and by X (once), each time after a different token, so
    # all three matches are equally long: both continuations are proposed, C first.
    a, b, c, x, e = 1, 2, 3, 4, 5
    r = make_request([a, b, c, e, 6, a, b, x, e, 7, a, b, c, 8, a, b])
    d = SuffixTreeDrafter(max_width=4)
    (tree,) = d.propose([r], [6])
    assert tree.root_token == b and tree.num_drafts == 6
    root_children = [tree.token_ids[i] for i in tree.children[0]]
    assert root_children[:2] == [c, x]
    assert len(paths_of(tree)) >= 2
    first = tree.children[0][0]
    # C was followed by 8 (latest) and E: both, the latest first on a tie.
    assert [tree.token_ids[i] for i in tree.children[first]] == [8, e]
    # max_width=1 gives a chain along the majority continuation, latest on ties.
    chain = SuffixTreeDrafter(max_width=1).propose([r], [4])[0]
    assert chain.is_chain and chain.draft_token_ids == [c, 8, a, b]


def test_suffix_tree_long_match_outweighs_short_ones() -> None:
    # The last 6 tokens occurred once, followed by X; shorter matches say C. Evidence from the
    # long match wins: the first draft is X and the budget goes down its continuation.
    a, b, c, x, e = 1, 2, 3, 4, 5
    r = make_request([a, b, c, e, a, b, x, e, a, b, c, e, a, b])
    (tree,) = SuffixTreeDrafter().propose([r], [4])
    assert tree.token_ids[tree.children[0][0]] == x
    assert tree.is_chain and tree.draft_token_ids == [x, e, a, b]


def test_suffix_tree_many_distinct_continuations() -> None:
    # After "0" comes 1, 2, 3 or 4 in different places: a wide root.
    prompt = [0, 1, 9, 0, 2, 9, 0, 3, 9, 0, 4, 9, 0]
    (tree,) = SuffixTreeDrafter(max_width=3).propose([make_request(prompt)], [8])
    assert len(tree.children[0]) == 3
    assert {tree.token_ids[i] for i in tree.children[0]} <= {1, 2, 3, 4}
    assert tree.num_drafts <= 8
    for i in range(1, tree.num_nodes):
        assert len(tree.children[i]) <= 3


def test_suffix_tree_budget_and_empty_cases() -> None:
    d = SuffixTreeDrafter()
    r = make_request([5, 6, 7, 5, 6, 8, 5, 6])
    for budget in range(6):
        assert d.propose([r], [budget])[0].num_drafts <= budget
    assert d.propose([r], [0])[0] == TokenTree.root_only(6)
    assert d.propose([make_request([1, 2, 3])], [4])[0] == TokenTree.root_only(3)
    strict = SuffixTreeDrafter(min_match=3)
    assert strict.propose([r], [4])[0].num_drafts == 0  # only 2-token matches


def test_suffix_tree_prefers_longer_matches() -> None:
    # "x y z" matched fully once (-> 7), "z" alone many times (-> 8): 7 comes first.
    prompt = [1, 2, 3, 7, 0, 3, 8, 0, 3, 8, 0, 3, 8, 0, 1, 2, 3]
    (tree,) = SuffixTreeDrafter().propose([make_request(prompt)], [2])
    assert tree.token_ids[tree.children[0][0]] == 7


# ---------------------------------------------------------------------------------------------
# Registry and protocol
# ---------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"ngram", "tree"} <= set(available_drafters())
    ngram = make_drafter("ngram", prompt_lookup_min=2, prompt_lookup_max=5)
    assert isinstance(ngram, NgramDrafter) and ngram.prompt_lookup_max == 5
    tree = make_drafter("tree", max_width=2)
    assert isinstance(tree, SuffixTreeDrafter)
    for d in (ngram, tree):
        assert isinstance(d, Drafter)
        assert d.kind == "deterministic"
    with pytest.raises(ValueError, match="unknown drafter"):
        make_drafter("nope")
    with pytest.raises(ValueError, match="bad options"):
        make_drafter("ngram", width=3)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        make_drafter("ngram", prompt_lookup_min=3, prompt_lookup_max=2)


def test_budget_validation() -> None:
    d = NgramDrafter()
    with pytest.raises(ValueError, match="one budget per request"):
        d.propose([make_request([1])], [])
    with pytest.raises(ValueError, match=">= 0"):
        d.propose([make_request([1])], [-1])
