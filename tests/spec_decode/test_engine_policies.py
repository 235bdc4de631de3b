"""The cost-aware policies in the whole engine: lossless, learning, never preempting.

Greedy outputs under ``goodput`` and ``smartspec_uniform`` must be exactly plain decoding's,
whatever budgets they choose step by step (chains, pruned trees, model drafters, preemption).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from server.config import SpeculativeConfig
from server.engine.cost_profile import profile_grid
from server.engine.sampling_params import SamplingParams
from server.spec_decode.learned import LearnedPolicy
from server.spec_decode.tree import TokenTree
from tests.spec_decode.test_engine_speculation import (
    make_engine,
    repetitive_token_prompts,
    tokens_of,
)

POLICIES = ["goodput", "smartspec_uniform"]
METHODS = [
    dict(method="ngram", num_speculative_tokens=8),
    dict(method="tree", num_speculative_tokens=8, max_tree_width=3),
    dict(method="synthetic", num_speculative_tokens=4, acceptance_rate=0.7),
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_outputs(tiny_llama_dir: Path) -> list[list[int]]:
    return tokens_of(make_engine(tiny_llama_dir).generate(repetitive_token_prompts(32), GREEDY))


@pytest.mark.parametrize("method", METHODS, ids=[m["method"] for m in METHODS])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_identity_and_the_policy_learns(
    policy: str, method: dict, tiny_llama_dir: Path, plain_outputs: list[list[int]]
) -> None:
    spec = SpeculativeConfig(policy=policy, cost_profile_seconds=5.0, **method)
    engine = make_engine(tiny_llama_dir, spec)
    assert tokens_of(engine.generate(repetitive_token_prompts(32), GREEDY)) == plain_outputs
    stats = engine.core.stats()
    assert stats.num_blocks_used == 0
    assert stats.speculation is not None
    p = stats.speculation.policy
    assert p.name == policy and p.num_predicted_steps > 0
    assert p.measured_seconds_total > 0 and p.predicted_seconds_total > 0
    assert math.isfinite(p.cost_model_relative_error)
    # The profile seeded the fit: the per-row coefficient is learned, not the default 0.
    assert p.cost_model_coefficients["rows"] != 0.0
    assert sum(stats.speculation.budget_counts) > 0
    assert stats.speculation.budget_sum == stats.num_draft_tokens


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_a_policy_that_verifies_nothing_still_learns_acceptance(
    policy: str, method: str, tiny_llama_dir: Path, plain_outputs: list[list[int]]
) -> None:
    """Estimates primed so low that no draft pays: the policy gives every request budget 0,
    and the acceptance it learns must still move, from the shadow drafts the speculator scores
    against the tokens plain decoding emits (else it could never speculate again)."""
    spec = SpeculativeConfig(
        policy=policy, method=method, num_speculative_tokens=4, cost_profile_seconds=2.0
    )
    engine = make_engine(tiny_llama_dir, spec)
    assert engine.core.speculator is not None
    learned = engine.core.speculator.policy
    assert isinstance(learned, LearnedPolicy)
    prime_to_never_draft(learned)
    primed = learned.estimator.global_prob(1)
    assert tokens_of(engine.generate(repetitive_token_prompts(32), GREEDY)) == plain_outputs
    assert learned.estimator.global_prob(1) > 2 * primed


def prime_to_never_draft(learned: LearnedPolicy) -> None:
    """300 rejected first drafts: no draft pays until the policy learns otherwise."""
    never = TokenTree((0, 5), (-1, 0))
    for _ in range(300):
        learned.estimator.observe("primer", never, ())
    learned.estimator.release(["primer"])


def test_draft_slots_a_policy_leaves_unused_do_not_cut_new_prompts_short(
    tiny_llama_dir: Path,
) -> None:
    """Decoding requests the policy gives no drafts hold one draft slot each (room to grow)
    while a new prompt is admitted, not their whole cap: the prompt's first chunk is the step's
    budget less the decode rows and those slots (64 - 2 - 2, cut at a block: 56). Holding the
    cap (8) left it 64 - 18 = 46 (40 at a block)."""
    spec = SpeculativeConfig(
        policy="goodput", method="ngram", num_speculative_tokens=8, cost_profile_seconds=1.0
    )
    engine = make_engine(tiny_llama_dir, spec, budget=64, block_size=8)
    core = engine.core
    assert core.speculator is not None and isinstance(core.speculator.policy, LearnedPolicy)
    prime_to_never_draft(core.speculator.policy)
    core.add_request("a", list(range(5, 13)), GREEDY)
    core.add_request("b", list(range(20, 28)), GREEDY)
    for _ in range(3):
        core.step()
    assert core.speculator.stats().budget_sum == 0
    core.add_request("c", list(range(30, 130)), GREEDY)
    core.step()
    assert core.scheduler.requests["c"].num_computed_tokens == 56


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_identity_with_preemption_forced(policy: str, tiny_llama_dir: Path) -> None:
    prompts = repetitive_token_prompts(16, seed=3)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    plain = make_engine(tiny_llama_dir).generate(prompts, params)
    spec = SpeculativeConfig(
        policy=policy, method="tree", num_speculative_tokens=6, cost_profile_seconds=2.0
    )
    engine = make_engine(tiny_llama_dir, spec, num_blocks=24)
    speculative = engine.generate(prompts, params)
    assert engine.core.stats().num_preemptions > 0
    assert tokens_of(speculative) == tokens_of(plain)


def test_speculation_alone_never_preempts(tiny_llama_dir: Path) -> None:
    """Short of blocks for draft slots, a request decodes plainly instead of evicting others:
    a cache that fits every request without drafts sees no preemption with them."""
    prompts = [p[:16] for p in repetitive_token_prompts(8, seed=4)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # 8 requests x (16 + 16) tokens = 32 blocks of 8; drafts would need up to 8 more each.
    spec = SpeculativeConfig(policy="fixed", method="ngram", num_speculative_tokens=8)
    engine = make_engine(tiny_llama_dir, spec, num_blocks=33)
    plain = make_engine(tiny_llama_dir, num_blocks=33).generate(prompts, params)
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(plain)
    stats = engine.core.stats()
    assert stats.num_preemptions == 0 and stats.num_blocks_used == 0


def test_profile_grid_is_cheapest_first_and_within_limits() -> None:
    grid = profile_grid(max_spec_tokens=8, max_num_seqs=16, max_num_batched_tokens=128)
    rows = [b * (1 + k) + chunk for b, k, chunk in grid]
    assert rows == sorted(rows) and rows[0] == 1
    assert all(b <= 16 and r <= 128 for (b, _, _), r in zip(grid, rows, strict=True))
    assert {k for _, k, _ in grid} == {0, 1, 2, 3, 4, 8}
    assert any(chunk for _, _, chunk in grid), "prefill chunks are profiled too"
