"""Acceptance estimates learned from verified trees: global, per request, calibrated scores."""

from __future__ import annotations

import numpy as np

from server.spec_decode.acceptance import AcceptanceEstimator
from server.spec_decode.tree import TokenTree


def chain(k: int, score: float | None = None) -> TokenTree:
    return TokenTree.chain(0, list(range(1, k + 1)), None if score is None else [score] * k)


def accepted_prefix(rng: np.random.Generator, alpha: float, k: int) -> list[int]:
    """Nodes 1..j: each position accepted with probability alpha given the previous one."""
    nodes = []
    for j in range(1, k + 1):
        if rng.random() >= alpha:
            break
        nodes.append(j)
    return nodes


def test_global_and_per_request_estimates_follow_observed_acceptance() -> None:
    rng = np.random.default_rng(0)
    est = AcceptanceEstimator(max_depth=4)
    for _ in range(300):
        est.observe("good", chain(4), accepted_prefix(rng, 0.9, 4))
        est.observe("poor", chain(4), accepted_prefix(rng, 0.1, 4))
        est.next_step()
    good, poor = est.chain_probs("good", 4), est.chain_probs("poor", 4)
    assert np.all(good > 0.75) and np.all(poor[:1] < 0.25)
    # A new request starts from the global estimate (between the two).
    fresh = est.chain_probs("new", 4)
    assert poor[0] < fresh[0] < good[0]
    assert np.allclose(fresh, est.global_probs())


def test_a_request_not_speculating_drifts_back_to_the_prior() -> None:
    est = AcceptanceEstimator(max_depth=2)
    for _ in range(20):
        est.observe("r", chain(2), [])
        est.observe("other", chain(2), [1, 2])
        est.next_step()
    low = est.chain_probs("r", 1)[0]
    for _ in range(200):
        est.observe("other", chain(2), [1, 2] if _ % 2 else [])
        est.next_step()
    assert est.chain_probs("r", 1)[0] > low + 0.2


def test_scores_are_calibrated_into_probabilities() -> None:
    rng = np.random.default_rng(1)
    est = AcceptanceEstimator(max_depth=4, score_edges=(1.5, 2.5, 3.5))
    for i in range(400):
        # Long matches (score 4) are right 90% of the time, one-token matches 20%.
        score, alpha = (4.0, 0.9) if i % 2 else (1.0, 0.2)
        est.observe(f"r{i % 7}", chain(3, score), accepted_prefix(rng, alpha, 3))
        est.next_step()
    strong = est.node_probs("new", chain(3, 4.0))
    weak = est.node_probs("new", chain(3, 1.0))
    assert strong[0] == 1.0 and np.all(strong[1:] > 0.75)
    assert weak[1] < 0.35
    values = est.path_values("new", chain(3, 4.0))
    assert np.allclose(values, np.cumprod(strong))
    assert any(t > 0 for _, _, t, _ in est.calibration_table())


def test_tree_nodes_are_tested_only_under_accepted_parents() -> None:
    est = AcceptanceEstimator(max_depth=3)
    # root -> 1 -> 2, root -> 3 -> 4: path 1 accepted, 2 rejected; 4 never tested.
    tree = TokenTree((0, 10, 11, 12, 13), (-1, 0, 1, 0, 3))
    for _ in range(50):
        est.observe("r", tree, [1])
        est.next_step()
    depth1, depth2 = est.global_probs()[:2]
    # Depth 1: nodes 1 (accepted) and 3 (rejected) -> about 1/2; depth 2: only node 2 -> ~0.
    assert 0.4 < depth1 < 0.6 and depth2 < 0.1


def test_a_requests_skill_is_judged_against_what_its_own_scores_predicted() -> None:
    """The global mix is long matches accepted 90% and one-token matches 20%. A request that
    only ever drafts one-token matches, accepted at exactly that 20%, is an average request:
    its estimate stays near a fresh request's (judged against the global mix it would read as
    unskilled and sink far below what it gets accepted). A request whose one-token matches
    land 60% of the time is rated above both."""
    est = AcceptanceEstimator(max_depth=2, score_edges=(1.5, 2.5, 3.5))
    for i in range(500):
        est.observe(f"long{i % 5}", chain(1, 4.0), [1] if i % 10 else [])
        est.observe(f"short{i % 5}", chain(1, 1.0), [1] if i % 5 == 0 else [])
        est.next_step()
    for i in range(40):
        est.observe("average", chain(1, 1.0), [1] if i % 5 == 0 else [])
        est.observe("skilled", chain(1, 1.0), [1] if i % 5 < 3 else [])
        for j in range(4):  # the rest of the traffic, average
            est.observe(f"short{j}", chain(1, 1.0), [1] if (i + j) % 5 == 0 else [])
        est.next_step()
    average = est.node_probs("average", chain(1, 1.0))[1]
    fresh = est.node_probs("new", chain(1, 1.0))[1]
    skilled = est.node_probs("skilled", chain(1, 1.0))[1]
    assert abs(fresh - 0.2) < 0.08  # the bucket (the skilled request lifts it a little)
    assert abs(average - fresh) < 0.05  # judged against the global mix: ~0.06
    assert skilled > average + 0.08 and skilled > fresh + 0.05


def test_one_lucky_long_shot_does_not_make_a_requests_confident_drafts_look_certain() -> None:
    """A request whose one-token match (rated ~0.15) happened to land: its long matches,
    rated 0.9, stay near a fresh request's. (The pooled ratio logit(acceptance) -
    logit(expected) made that one hit a +1.5 logit skill, rated its long matches 0.97, and the
    policy verified exactly the requests that had been lucky.)"""
    est = AcceptanceEstimator(max_depth=2, score_edges=(1.5, 2.5, 3.5))
    for i in range(600):
        est.observe(f"long{i % 5}", chain(1, 4.0), [1] if i % 10 else [])
        est.observe(f"short{i % 5}", chain(1, 1.0), [1] if i % 7 == 0 else [])
        est.next_step()
    est.observe("lucky", chain(1, 1.0), [1])
    fresh = est.node_probs("new", chain(1, 4.0))[1]
    lucky = est.node_probs("lucky", chain(1, 4.0))[1]
    assert 0.85 < fresh < 0.93
    assert lucky - fresh < 0.03


def test_a_score_is_recalibrated_when_the_traffic_changes() -> None:
    """Long matches landed 90% of the time on a long spell of repetitive traffic, then 40% on
    chat: within ~60 tests a fresh request's long match is rated near what chat gets, not
    what the long-run counts (~1000 tests) remember."""
    est = AcceptanceEstimator(max_depth=2, score_edges=(1.5, 2.5, 3.5))
    for i in range(1000):
        est.observe(f"code{i % 5}", chain(1, 4.0), [1] if i % 10 else [])
        est.next_step()
    for i in range(60):
        est.observe(f"chat{i % 5}", chain(1, 4.0), [1] if i % 5 < 2 else [])
        est.next_step()
    assert est.node_probs("new", chain(1, 4.0))[1] < 0.6
