"""Training-free drafters: dynamic trees, Token Recycling, the cross-request suffix cache and
the composite ``auto`` drafter, as plain objects (the engine tests check them end to end)."""

from __future__ import annotations

import gc
import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch

from server.engine.plan import StepPlan
from server.model.spec_step import top_tokens
from server.spec_decode.composite import AutoDrafter
from server.spec_decode.drafter import (
    Drafter,
    FinishedRequestConsumer,
    TopTokenConsumer,
    TopTokens,
    VerifiedTree,
    VerifiedTreeConsumer,
)
from server.spec_decode.drafters import make_drafter
from server.spec_decode.recycle import RecycleDrafter, TopKTable
from server.spec_decode.suffix_cache import SuffixCache
from server.spec_decode.suffix_drafter import SuffixDrafter
from server.spec_decode.tree import TokenTree
from server.spec_decode.tree_builder import Child, grow_tree
from tests.spec_decode.test_drafters import make_request, paths_of

V = 64


# ---------------------------------------------------------------------------------------------
# Dynamic trees (grow_tree)
# ---------------------------------------------------------------------------------------------


def table_expander(table: dict[tuple[int, ...], list[tuple[int, float]]]):
    """expand over an explicit table: path (tuple of tokens) -> [(token, conditional prob)]."""

    def expand(path: tuple[int, ...]) -> list[Child[tuple[int, ...]]]:
        return [Child(t, p, p, (*path, t)) for t, p in table.get(path, [])]

    return expand


def path_probs(tree: TokenTree) -> list[float]:
    probs = [1.0]
    for i in range(1, tree.num_nodes):
        probs.append(probs[tree.parents[i]] * tree.scores[i])
    return probs


def test_a_deep_likely_path_beats_a_wide_shallow_one() -> None:
    # Root children: 1 (0.9) then 2, 3, 4 (0.2 each); under 1 a chain of 0.9s.
    table = {
        (): [(1, 0.9), (2, 0.2), (3, 0.2), (4, 0.2)],
        (1,): [(5, 0.9)],
        (1, 5): [(6, 0.9)],
        (1, 5, 6): [(7, 0.9)],
    }
    tree = grow_tree(0, (), table_expander(table), budget=4, max_width=4)
    assert paths_of(tree) == {(1, 5, 6, 7)}
    # With more budget the shallow siblings come in once the chain's value drops below 0.2.
    tree = grow_tree(0, (), table_expander(table), budget=7, max_width=4)
    assert len(tree.children[0]) == 4 and tree.max_depth == 4


def test_grow_tree_takes_the_highest_path_probabilities_parent_closed() -> None:
    rng = np.random.default_rng(0)
    table: dict[tuple[int, ...], list[tuple[int, float]]] = {}
    frontier: list[tuple[int, ...]] = [()]
    while frontier:
        path = frontier.pop()
        if len(path) >= 4:
            continue
        kids = sorted(
            ((int(t), float(rng.uniform(0.05, 1.0))) for t in rng.choice(V, 3, False)),
            key=lambda kp: -kp[1],
        )
        table[path] = kids
        frontier += [(*path, t) for t, _ in kids]
    all_probs = []

    def collect(path: tuple[int, ...], prob: float) -> None:
        for t, p in table.get(path, []):
            all_probs.append(prob * p)
            collect((*path, t), prob * p)

    collect((), 1.0)
    for budget in (1, 3, 8, 20):
        tree = grow_tree(0, (), table_expander(table), budget, max_width=3)
        assert tree.num_drafts == budget
        chosen = sorted(path_probs(tree)[1:], reverse=True)
        best = sorted(all_probs, reverse=True)[:budget]
        np.testing.assert_allclose(chosen, best)
        assert all(tree.parents[i] < i for i in range(1, tree.num_nodes))


def test_grow_tree_width_duplicates_and_empty_budget() -> None:
    table = {(): [(1, 0.5), (1, 0.4), (2, 0.3), (3, 0.2), (4, 0.1)]}
    tree = grow_tree(0, (), table_expander(table), budget=10, max_width=2)
    assert [tree.token_ids[c] for c in tree.children[0]] == [1, 2]  # the repeated 1 skipped
    assert grow_tree(0, (), table_expander(table), 0, 2) == TokenTree.root_only(0)


# ---------------------------------------------------------------------------------------------
# Token Recycling
# ---------------------------------------------------------------------------------------------


def top(
    rows: dict[int, list[tuple[int, float]]], request_id: str = "r", prev: int = -1
) -> TopTokens:
    """Top-k rows for single tokens (``prev`` -1) or for pairs (prev, token)."""
    tokens = list(rows)
    k = max(len(v) for v in rows.values())
    ids = np.full((len(tokens), k), -1, dtype=np.int32)
    probs = np.zeros((len(tokens), k), dtype=np.float32)
    for i, t in enumerate(tokens):
        for j, (tid, p) in enumerate(rows[t]):
            ids[i, j], probs[i, j] = tid, p
    prevs = np.full(len(tokens), prev)
    return TopTokens((request_id,) * len(tokens), np.array(tokens), prevs, ids, probs)


def test_recycle_drafts_from_the_targets_recorded_top_k() -> None:
    d = RecycleDrafter(vocab_size=V, top_k=2, max_width=2, scope="shared")
    assert isinstance(d, Drafter) and isinstance(d, TopTokenConsumer)
    r = make_request([9, 10, 11])
    d.observe_top_tokens(top({11: [(20, 0.8), (21, 0.1)], 20: [(30, 0.9), (31, 0.05)]}))
    (tree,) = d.propose([r], [3])
    # 11 -> 20 (0.8) -> 30 (0.72), then 21 (0.1) beats 31 (0.04).
    assert sorted(paths_of(tree)) == [(20, 30), (21,)]
    assert tree.scores[tree.token_ids.index(20)] == pytest.approx(0.8)
    # A newer top-k for 11 replaces the old one.
    d.observe_top_tokens(top({11: [(40, 0.6), (41, 0.3)]}))
    (tree,) = d.propose([r], [1])
    assert tree.draft_token_ids == [40]


def test_recycle_pair_rows_win_over_single_token_rows() -> None:
    d = RecycleDrafter(vocab_size=V, top_k=2, scope="shared")
    d.observe_top_tokens(top({11: [(30, 0.6)]}, prev=9))  # after "9 11": 30
    d.observe_top_tokens(top({11: [(20, 0.5)]}))  # after 11, most recently: 20
    (tree,) = d.propose([make_request([9, 11])], [1])
    assert tree.draft_token_ids == [30] and tree.scores[1] == pytest.approx(1.6)
    (tree,) = d.propose([make_request([8, 11])], [1])
    assert tree.draft_token_ids == [20] and tree.scores[1] == pytest.approx(0.5)


def test_top_tokens_runs_are_each_requests_consecutive_rows() -> None:
    n = 6
    rows = TopTokens(
        ("a", "b", "b", "b", "c", "a"),
        np.arange(n),
        np.arange(n),
        np.zeros((n, 2), np.int32),
        np.zeros((n, 2), np.float32),
    )
    runs = [(rid, (s.start, s.stop)) for rid, s in rows.request_runs()]
    assert runs == [("a", (0, 1)), ("b", (1, 4)), ("c", (4, 5)), ("a", (5, 6))]


def test_recycle_learns_rows_of_requests_interleaved_in_a_step() -> None:
    d = RecycleDrafter(vocab_size=V, top_k=1, scope="request")
    a, b = make_request([1, 2]), make_request([1, 3])
    step = TopTokens(
        (a.request_id, b.request_id, a.request_id),
        np.array([2, 3, 40]),
        np.array([1, 1, -1]),  # a's second row starts a sequence: no pair row for it
        np.array([[40], [50], [41]], np.int32),
        np.array([[0.9], [0.8], [0.7]], np.float32),
    )
    d.observe_top_tokens(step)
    (tree_a,) = d.propose([a], [2])
    assert paths_of(tree_a) == {(40, 41)}
    assert d.propose([b], [1])[0].draft_token_ids == [50]


def test_recycle_tables_have_a_fixed_size() -> None:
    table = TopKTable(capacity=4, top_k=2)
    rows = np.arange(20, dtype=np.int32).reshape(10, 2)
    table.put(list(range(10)), rows, np.ones((10, 2), dtype=np.float32))
    assert len(table) == 4
    assert table.get(0) is None and table.get(9) is not None  # the oldest rows made room
    assert table.ids[table.get(9)].tolist() == [18, 19]


def test_recycle_is_seeded_from_the_prompt() -> None:
    d = RecycleDrafter(vocab_size=V, top_k=4)
    (tree,) = d.propose([make_request([5, 6, 7, 5])], [3])
    assert tree.draft_token_ids == [6, 7, 5]  # the prompt's bigrams, followed round the cycle


def test_recycle_scopes() -> None:
    shared = RecycleDrafter(vocab_size=V, top_k=2, scope="shared")
    own = RecycleDrafter(vocab_size=V, top_k=2, scope="request")
    a, b = make_request([1, 2]), make_request([3, 2])
    for d in (shared, own):
        d.observe_top_tokens(top({2: [(50, 0.9)]}, request_id=a.request_id))
    # Shared: what a taught drafts b too. Per request: b starts cold.
    assert shared.propose([b], [1])[0].draft_token_ids == [50]
    assert own.propose([b], [1])[0].draft_token_ids == []
    assert own.propose([a], [1])[0].draft_token_ids == [50]
    assert own.state_bytes > 0
    own.release([a.request_id, b.request_id])
    assert own.state_bytes == 0
    with pytest.raises(ValueError, match="scope"):
        RecycleDrafter(vocab_size=V, scope="global")  # type: ignore[arg-type]


def test_recycle_layered_scope_puts_the_shared_table_behind_a_requests_own() -> None:
    d = RecycleDrafter(vocab_size=V, top_k=2, max_width=2, scope="layered")
    a, b = make_request([1, 2]), make_request([3, 2])
    d.observe_top_tokens(top({2: [(50, 0.9)]}, request_id=a.request_id))
    # b has never computed token 2: the shared table (what a taught) drafts it, scored apart.
    (tree,) = d.propose([b], [1])
    assert tree.draft_token_ids == [50] and tree.scores[1] == pytest.approx(2.9)
    # b's own row for 2 comes first, and its probability stands for a token both list.
    d.observe_top_tokens(top({2: [(50, 0.3), (60, 0.2)]}, request_id=b.request_id))
    (tree,) = d.propose([b], [2])
    assert tree.draft_token_ids == [50, 60]
    assert tree.scores[1:] == pytest.approx((0.3, 0.2))
    # The shared row now holds b's newer top-k; a's own row still says 50 at 0.9.
    assert d.propose([a], [1])[0].scores[1] == pytest.approx(0.9)
    # Releasing requests frees their own tables and keeps the shared one.
    shared_only = d.state_bytes - sum(d.tables(r.request_id).nbytes for r in (a, b))
    d.release([a.request_id, b.request_id])
    assert d.state_bytes == shared_only > 0
    assert d.propose([make_request([7, 2])], [1])[0].draft_token_ids == [50]


def test_recycle_scores_of_each_row_kind_fall_in_their_own_buckets() -> None:
    """own single / own pair / shared single / shared pair: four disjoint score ranges."""
    edges = np.asarray(RecycleDrafter.score_edges)
    assert (np.diff(edges) > 0).all()
    kinds = [np.digitize([offset + 0.01, offset + 0.99], edges) for offset in (0, 1, 2, 3)]
    for lower, upper in itertools.pairwise(kinds):
        assert lower[1] < upper[0]


def test_runner_top_tokens_are_torch_topk_of_each_row() -> None:
    a, b = make_request([1, 2, 3]), make_request([4, 5])
    tree = TokenTree((5, 6, 7), (-1, 0, 0))
    plan = StepPlan([a, b], {a.request_id: 1, b.request_id: 1}, spec_trees={b.request_id: tree})
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    # a samples from row 0; b's tree occupies rows 1..3; row 4 belongs to nobody.
    out = top_tokens(logits, plan, [(a, 0)], [(b, 1)], k=3)
    assert out.request_ids == (a.request_id, b.request_id, b.request_id, b.request_id)
    assert out.tokens.tolist() == [3, 5, 6, 7]
    assert out.prev_tokens.tolist() == [2, 4, 5, 5]  # node 2's parent is the root, 5
    expect = torch.topk(logits[:4], 3)
    assert out.ids.tolist() == expect.indices.tolist()
    np.testing.assert_allclose(
        out.probs, torch.softmax(logits[:4], -1).gather(1, expect.indices).numpy(), rtol=1e-5
    )
    # Rows out of order (a's row after b's tree): gathered rather than sliced.
    out = top_tokens(logits, plan, [(a, 4)], [(b, 1)], k=3)
    order = [4, 1, 2, 3]
    expect = torch.topk(logits[order], 3)
    assert out.ids.tolist() == expect.indices.tolist()
    np.testing.assert_allclose(
        out.probs, torch.softmax(logits[order], -1).gather(1, expect.indices).numpy(), rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Cross-request suffix cache
# ---------------------------------------------------------------------------------------------


def test_suffix_cache_finds_continuations_with_match_lengths() -> None:
    cache = SuffixCache(max_bytes=2**20)
    cache.add([1, 2, 3, 4, 5, 6])
    cache.add([9, 3, 4, 7, 8])
    found = cache.matches(np.array([0, 2, 3, 4]), count=2, max_match=8, limit=8)
    # Newest first: "3 4" -> 7 8 (2 tokens matched), then "2 3 4" -> 5 6 (3 matched).
    assert found == [([7, 8], 2), ([5, 6], 3)]
    assert cache.matches(np.array([4, 3]), 2, 8, 8) == []


def test_suffix_cache_evicts_least_recently_used_under_its_cap() -> None:
    one = SuffixCache(max_bytes=10**9)
    one.add(list(range(100, 200)))
    cap = int(2.5 * one.nbytes)
    cache = SuffixCache(max_bytes=cap)
    cache.add(list(range(100, 200)))  # A
    cache.add(list(range(300, 400)))  # B
    cache.matches(np.array([110, 111]), 3, 8, 8)  # A is used: B is now the oldest
    cache.add(list(range(500, 600)))  # C: evicts B
    assert cache.nbytes <= cap and cache.num_sequences == 2
    assert cache.matches(np.array([310, 311]), 3, 8, 8) == []
    assert cache.matches(np.array([110, 111]), 3, 8, 8)[0][0] == [112, 113, 114]


def test_a_second_similar_request_is_drafted_from_the_first_ones_output() -> None:
    d = SuffixDrafter(cache_mb=1)
    first = make_request([1, 2, 3], output=[40, 41, 42, 43, 44, 45, 46])
    d.propose([first], [4])
    d.observe_finished([first])
    d.release([first.request_id])
    # Another request reaches "41 42" on its own: the first one's output continues it.
    second = make_request([7, 8, 41, 42])
    (tree,) = d.propose([second], [4])
    assert tree.draft_token_ids == [43, 44, 45, 46]
    assert make_drafter("tree").propose([make_request([7, 8, 41, 42])], [4])[0].num_drafts == 0


def test_suffix_cache_memory_stays_under_its_cap_over_1000_requests() -> None:
    cap = 2 * 2**20
    rng = np.random.default_rng(1)
    gc.collect()
    tracemalloc.start()
    try:
        d = SuffixDrafter(cache_mb=cap / 2**20)
        base = tracemalloc.get_traced_memory()[0]
        peak_estimate = 0
        for i in range(1000):
            r = make_request(rng.integers(0, 5000, size=int(rng.integers(50, 400))).tolist())
            for t in rng.integers(0, 5000, size=64).tolist():
                r.append_output_token(t)
            d.propose([r], [4])
            d.observe_finished([r])
            d.release([r.request_id])
            peak_estimate = max(peak_estimate, d.state_bytes)
            if i == 999:
                gc.collect()
                measured = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert d.cache.num_evicted > 0, "1000 requests were meant to overflow the cap"
    assert peak_estimate <= cap
    # The estimate is what the cap limits: it must not undercount what is really held.
    assert measured <= 1.15 * d.state_bytes, (measured, d.state_bytes)
    print(f"suffix cache: estimate {d.state_bytes} B, measured {measured} B, cap {cap} B")


# ---------------------------------------------------------------------------------------------
# The composite drafter
# ---------------------------------------------------------------------------------------------


def test_auto_merges_sources_within_the_budget() -> None:
    d = AutoDrafter(vocab_size=V, max_width=4)
    assert isinstance(d, Drafter)
    assert isinstance(d, TopTokenConsumer) and isinstance(d, VerifiedTreeConsumer)
    assert isinstance(d, FinishedRequestConsumer)
    # The context repeats "1 2 3 4" (the suffix source says 3 4 1 2 ... after "1 2"); recycle
    # says 9 after 2.
    r = make_request([1, 2, 3, 4, 1, 2])
    d.observe_top_tokens(top({2: [(9, 0.9)]}, request_id=r.request_id))
    for budget in (1, 2, 4, 6):
        (tree,) = d.propose([r], [budget])
        assert tree.num_drafts <= budget
    (tree,) = d.propose([r], [6])
    assert paths_of(tree) == {(3, 4, 1, 2, 3, 4)}


def test_auto_adds_recycled_nodes_only_where_the_suffix_source_has_none() -> None:
    """The suffix source's tree is the trunk: a recycled candidate does not become a sibling
    of its nodes (where the suffix cache knows the answer such siblings took the right
    branch's budget), but it drafts where the suffix source found no match, and it witnesses
    the suffix source's nodes it also proposes."""
    d = AutoDrafter(vocab_size=V, max_width=4)
    r = make_request([1, 2, 3, 4, 1, 2])
    (tree,) = d.propose([r], [4])
    # Recycle's table is seeded from the prompt's n-grams: it witnesses the suffix's 3.
    assert dict(d._last[r.request_id].nodes[1].witnesses).keys() == {"suffix", "recycle"}
    d.observe_top_tokens(top({2: [(9, 0.9)]}, request_id=r.request_id))
    (tree,) = d.propose([r], [4])
    assert [tree.token_ids[c] for c in tree.children[0]] == [3]  # no 9 beside the suffix's 3
    # No earlier occurrence of the last token: the suffix source has nothing, recycle drafts.
    fresh = make_request([5, 6])
    d.observe_top_tokens(top({6: [(8, 0.9)]}, request_id=fresh.request_id))
    (tree,) = d.propose([fresh], [2])
    assert tree.draft_token_ids[:1] == [8]
    # The n-gram drafter's match is one of the suffix source's votes: not a source of its own.
    assert not hasattr(d, "ngram")


def test_auto_calibrates_each_source_from_verified_trees() -> None:
    d = AutoDrafter(vocab_size=V, recycle_scope="shared")
    before = d.calibration.prob("recycle", 0.9)
    for i in itertools.count():
        r = make_request([1, 2])
        d.observe_top_tokens(top({2: [(9, 0.95)]}, request_id=r.request_id))
        (tree,) = d.propose([r], [1])
        assert tree.draft_token_ids == [9]
        # The target never agrees: the recycled 0.95s are rejected every time.
        d.observe_verified([VerifiedTree(r.request_id, tree, ())])
        d.release([r.request_id])
        if i == 50:
            break
    after = d.calibration.prob("recycle", 0.9)
    assert after < 0.2 < before
    # Accepted drafts raise it again.
    r = make_request([1, 2])
    (tree,) = d.propose([r], [1])
    for _ in range(200):
        d.observe_verified([VerifiedTree(r.request_id, tree, (1,))])
    assert d.calibration.prob("recycle", 0.9) > 0.8


def test_auto_does_not_count_agreeing_sources_twice() -> None:
    """The recycle table starts from the prompt's n-grams, which the suffix source matches
    too: where both propose a node that lands half the time, each source learns 0.5, and
    their noisy-or (0.75) counts the same evidence twice; the agreement correction brings it
    to ~0.5."""
    d = AutoDrafter(vocab_size=V)
    for i in range(400):
        r = make_request([1, 2, 3, 4, 1, 2])  # the suffix source says 3 after "1 2"
        (tree,) = d.propose([r], [1])
        assert tree.draft_token_ids == [3]
        d.observe_verified([VerifiedTree(r.request_id, tree, (1,) if i % 2 else ())])
        witnesses = dict(d._last[r.request_id].nodes[1].witnesses)
        d.release([r.request_id])
    # Recycle too: its table is seeded from the prompt's own n-grams.
    assert set(witnesses) == {"suffix", "recycle"}
    probs = [d.calibration.prob(source, score) for source, score in witnesses.items()]
    assert probs == pytest.approx([0.5] * 2, abs=0.08)
    assert 1 - math.prod(1 - p for p in probs) > 0.7  # what the noisy-or alone would say
    assert tree.scores is not None and tree.scores[1] == pytest.approx(0.5, abs=0.1)
    ((suffix_bucket, with_recycle, _),) = d.agreement.table()
    assert suffix_bucket > 0 and with_recycle


def test_auto_calibrates_the_shared_recycle_rows_apart_from_a_requests_own() -> None:
    d = AutoDrafter(vocab_size=V, recycle_scope="layered")
    d.observe_top_tokens(top({2: [(9, 0.95)]}, request_id="earlier"))
    r = make_request([1, 2])
    (tree,) = d.propose([r], [1])
    assert tree.draft_token_ids == [9]  # from the shared table: r never computed token 2
    own, shared = d.calibration.prob("recycle", 0.95), d.calibration.prob("recycle", 2.95)
    for _ in range(50):
        d.observe_verified([VerifiedTree(r.request_id, tree, ())])
    assert d.calibration.prob("recycle", 2.95) < 0.2 < shared
    assert d.calibration.prob("recycle", 0.95) == own


def test_registry_builds_the_new_drafters() -> None:
    assert isinstance(make_drafter("recycle", vocab_size=V), RecycleDrafter)
    assert isinstance(make_drafter("suffix", cache_mb=1), SuffixDrafter)
    assert isinstance(make_drafter("auto", vocab_size=V), AutoDrafter)


def test_auto_calibrates_each_depth_apart() -> None:
    """A source whose deep nodes land while its first ones miss (a copied span once on track)
    is learned by depth, so a deep node is not priced as a first one."""
    d = AutoDrafter(vocab_size=V)
    for _ in range(100):
        d.calibration.add("suffix", 1.0, False, depth=1)
        d.calibration.add("suffix", 1.0, True, depth=5)
    assert d.calibration.prob("suffix", 1.0, depth=1) < 0.1
    assert d.calibration.prob("suffix", 1.0, depth=6) > 0.9
    tested, rate = d.calibration.table()["suffix"][-1]
    assert tested == pytest.approx(200, rel=0.1) and rate == pytest.approx(0.5)


def test_auto_spends_its_budget_down_a_span_whose_deep_nodes_land() -> None:
    d = AutoDrafter(vocab_size=V)
    for i in range(200):
        d.calibration.add("suffix", 1.0, i % 2 == 0, depth=1)  # first tokens: half land
        d.calibration.add("suffix", 1.0, i % 20 != 0, depth=2)  # once on track: 95%
        d.calibration.add("suffix", 1.0, i % 20 != 0, depth=3)
        d.calibration.add("suffix", 0.3, i % 10 < 3, depth=1)  # minority votes: 30%
    trees = {
        # A unanimous span 1 2 3, and three minority candidates beside its first token.
        "suffix": TokenTree(
            (0, 1, 2, 3, 5, 6, 7), (-1, 0, 1, 2, 0, 0, 0), (0.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3)
        ),
        "recycle": TokenTree.root_only(0),
    }
    tree, _ = d._merge(trees, 3)
    assert paths_of(tree) == {(1, 2, 3)}
