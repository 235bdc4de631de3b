"""The policies by name: goodput, smartspec_uniform, fixed, none (no model: plain objects)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.speculation import Speculator, pruned_children_scored
from server.spec_decode.allocator import StepBase
from server.spec_decode.cost_model import CostModel, StepShape
from server.spec_decode.goodput import GoodputPolicy
from server.spec_decode.ngram import NgramDrafter
from server.spec_decode.policies import available_policies, make_policy
from server.spec_decode.policy import PolicyContext, StepObservation, VerifiedTree
from server.spec_decode.smartspec import SmartSpecUniform
from server.spec_decode.tree import TokenTree


def requests(n: int) -> list[Request]:
    return [Request(f"r{i}", [1, 2, 3], SamplingParams(), frozenset(), 10_000) for i in range(n)]


def base(batch: int) -> StepBase:
    return StepBase(StepShape(batch, batch, 100 * batch, batch), batch)


def teach(policy: GoodputPolicy | SmartSpecUniform, alphas: dict[str, float], k: int = 8) -> None:
    """Feeds the policy verified chains accepted with the given per-request rates."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        verified = []
        for rid, alpha in alphas.items():
            accepted = []
            for j in range(1, k + 1):
                if rng.random() >= alpha:
                    break
                accepted.append(j)
            verified.append(VerifiedTree(rid, TokenTree.chain(0, list(range(k))), tuple(accepted)))
        shape = StepShape(len(alphas), len(alphas), 0, len(alphas))
        policy.observe(StepObservation(shape, 0.0, verified))


def context(cost: CostModel, free: bool = False) -> PolicyContext:
    return PolicyContext(max_spec_tokens=8, free_proposals=free, cost_model=cost)


def test_registry_names_and_errors() -> None:
    assert {"none", "fixed", "smartspec_uniform", "goodput"} <= set(available_policies())
    with pytest.raises(ValueError, match="unknown speculation policy 'bogus'"):
        make_policy("bogus", PolicyContext(4))
    assert make_policy("fixed", PolicyContext(4)).allocate(base(2), requests(2), [3, 1]) == [3, 1]
    assert make_policy("none", PolicyContext(4)).allocate(base(2), requests(2), [3, 1]) == [0, 0]


def test_goodput_gives_each_request_its_own_budget() -> None:
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    policy = GoodputPolicy(context(cost))
    teach(policy, {"r0": 0.95, "r1": 0.05, "r2": 0.6})
    budgets = policy.allocate(base(3), requests(3), [8, 8, 8])
    assert budgets[0] > budgets[2] > budgets[1] == 0
    assert policy.stats().estimated_goodput > 3 / cost.predict(base(3).shape)


def test_goodput_prunes_free_proposals_to_a_tree() -> None:
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.004})
    policy = GoodputPolicy(context(cost, free=True))
    teach(policy, {"r0": 0.5})
    reqs = requests(1)
    assert policy.allocate(base(1), reqs, [8]) == [8]  # propose everything
    wide = TokenTree((9, 1, 2, 3, 4, 5, 6, 7, 8), (-1, 0, 1, 2, 0, 0, 4, 0, 3))
    (pruned,) = policy.select(base(1), reqs, [wide])
    assert 0 < pruned.num_drafts < wide.num_drafts
    assert pruned.root_token == 9 and all(p < i for i, p in enumerate(pruned.parents) if i)
    # Path values fall with depth, so the kept nodes are the shallowest ones: no node is
    # kept while a shallower one is dropped.
    assert sorted(pruned.depths[1:]) == sorted(wide.depths[1:])[: pruned.num_drafts]


def test_hysteresis_keeps_budgets_between_near_equal_allocations() -> None:
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    steady = GoodputPolicy(context(cost), hysteresis=0.05)
    teach(steady, {"r0": 0.7, "r1": 0.7})
    reqs = requests(2)
    first = steady.allocate(base(2), reqs, [8, 8])
    # Small swings in the step's shape must not move the budgets.
    for batch_kv in (90, 110, 95, 105):
        b = StepBase(StepShape(2, 2, batch_kv * 2, 2), 2)
        assert steady.allocate(b, reqs, [8, 8]) == first


def test_smartspec_uniform_needs_ten_percent_and_rechooses_every_u_steps() -> None:
    # Speculation would pay a little (< 10%): the 1.1x margin on k = 0 keeps it off.
    marginal = CostModel.from_coefficients({"intercept": 0.010, "rows": 0.0065})
    policy = SmartSpecUniform(context(marginal), every=4)
    teach(policy, {"r0": 0.5})
    assert policy.allocate(base(1), requests(1), [8]) == [0]
    # ... where goodput, with no such margin, takes the ~9% gain.
    goodput = GoodputPolicy(context(marginal))
    teach(goodput, {"r0": 0.5})
    assert goodput.allocate(base(1), requests(1), [8]) == [1]
    # Cheap verification and good drafts: one k for everyone, capped per request.
    cheap = CostModel.from_coefficients({"intercept": 0.05, "rows": 0.0005})
    policy = SmartSpecUniform(context(cheap), every=4)
    teach(policy, {"r0": 0.9, "r1": 0.2})
    budgets = policy.allocate(base(2), requests(2), [8, 3])
    assert budgets[0] > 0 and budgets[1] == min(budgets[0], 3)
    k = policy.k
    # Re-chosen only every 4 steps, even if the caps change.
    for _ in range(3):
        assert policy.allocate(base(2), requests(2), [8, 8]) == [k, k]


def test_goodput_does_not_even_propose_when_no_draft_could_pay() -> None:
    compute_bound = CostModel.from_coefficients({"rows": 0.010})
    policy = GoodputPolicy(context(compute_bound, free=True))
    teach(policy, {"r0": 0.6, "r1": 0.6})
    assert policy.allocate(base(2), requests(2), [8, 8]) == [0, 0]
    # The estimate it exports is plain decoding's: 2 tokens in the predicted step.
    plain = 2 / compute_bound.predict(base(2).shape)
    assert policy.stats().estimated_goodput == pytest.approx(plain)
    idle = CostModel.from_coefficients({"intercept": 0.05, "rows": 0.0001})
    policy = GoodputPolicy(context(idle, free=True))
    teach(policy, {"r0": 0.6, "r1": 0.6})
    assert policy.allocate(base(2), requests(2), [8, 8]) == [8, 8]


def test_reservations_hold_what_each_policy_may_use_before_new_prompts() -> None:
    """fixed holds the whole cap (it uses it), none nothing, the learned policies room for a
    request's last budget to double plus one (1 before its first step, never above the cap)."""
    assert make_policy("fixed", PolicyContext(8)).reservation(8, 0) == 8
    assert make_policy("none", PolicyContext(8)).reservation(8, None) == 0
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    for learned in (GoodputPolicy(context(cost)), SmartSpecUniform(context(cost))):
        got = [learned.reservation(8, last) for last in (None, 0, 1, 3, 7, 8)]
        assert got == [1, 1, 3, 7, 8, 8]
        assert learned.reservation(2, 5) == 2


def _shadowed_per_step(policy: GoodputPolicy, steps: int) -> list[set[str]]:
    """The requests a batch of 10 (all of whose contexts repeat, so prompt lookup always
    has a draft) has shadowed in each of ``steps`` steps."""
    speculator = Speculator(NgramDrafter(), policy, 8)
    batch = []
    for i in range(10):
        r = Request(f"r{i}", [7, 8, 9, 7, 8, 9, 7, 8], SamplingParams(), frozenset(), 10_000)
        r.append_output_token(9)
        r.num_computed_tokens = r.num_tokens - 1  # decoding: its last token to compute
        batch.append(r)
    seen: list[set[str]] = []
    for _ in range(steps):
        plan = StepPlan(
            batch,
            {r.request_id: 1 for r in batch},
            spec_budgets={r.request_id: 8 for r in batch},
        )
        speculator.fill(plan)
        assert not plan.spec_trees  # nothing verified
        seen.append(set(speculator._shadows))
    return seen


def _never_accepting_policy() -> GoodputPolicy:
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.02})
    policy = GoodputPolicy(PolicyContext(8, free_proposals=True, cost_model=cost))
    never = TokenTree((0, 5), (-1, 0))
    for _ in range(300):
        policy.estimator.observe("primer", never, ())
    return policy


def test_shadow_drafts_are_a_rotating_sample_of_the_idle_requests() -> None:
    """A policy that gives every request of a batch of 10 no budget: each step shadows at
    most 4 of them (bounded proposal work however large the batch), those shadowed longest
    ago first, so every request is sampled within 3 steps."""
    policy = _never_accepting_policy()
    policy.quiet_steps = 0
    seen = _shadowed_per_step(policy, 3)
    assert [len(s) for s in seen] == [4, 4, 4]
    assert seen[0] == {"r0", "r1", "r2", "r3"} and seen[1] == {"r4", "r5", "r6", "r7"}
    assert set().union(*seen) == {f"r{i}" for i in range(10)}


def test_a_quiet_step_shadows_one_request() -> None:
    """In goodput's quiet steps (nothing reads the estimates until the next valued step)
    the speculator shadows one idle request a step, still the one shadowed longest ago."""
    policy = _never_accepting_policy()
    seen = _shadowed_per_step(policy, 3)
    assert seen == [{"r0", "r1", "r2", "r3"}, {"r4"}, {"r5"}]


def test_proposals_the_policy_prunes_to_nothing_are_shadowed() -> None:
    """Goodput prunes a one-token-match proposal that its calibration rates poorly. The
    proposal's first draft is still scored against the token plain decoding emits, so the
    one-token bucket keeps learning from the proposals it is not verifying (otherwise its
    estimate would only move on proposals the policy already liked)."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.01})
    policy = GoodputPolicy(
        PolicyContext(8, free_proposals=True, score_edges=NgramDrafter.score_edges, cost_model=cost)
    )
    for _ in range(200):  # long matches land, one-token matches never do
        policy.estimator.observe("primer", TokenTree.chain(0, [5], [6.0]), (1,))
        policy.estimator.observe("primer", TokenTree.chain(0, [5], [1.0]), ())
    speculator = Speculator(NgramDrafter(), policy, 8)
    # The last token (3) occurred once before, behind a different token: a one-token match.
    r = Request("r", [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 10_000)
    r.append_output_token(3)
    r.num_computed_tokens = r.num_tokens - 1  # decoding: its last token to compute
    plan = StepPlan([r], {"r": 1}, spec_budgets={"r": 8})
    speculator.fill(plan)
    assert not plan.spec_trees
    shadow = speculator._shadows["r"]
    assert shadow.num_drafts == 1 and shadow.token_ids[1] == 4
    before = policy.estimator.calibration_table()[0]
    output = RunnerOutput(sampled_token_ids={"r": [4]})
    speculator.observe(plan, output, 0.03)
    after = policy.estimator.calibration_table()[0]
    assert after[2] > before[2] and after[3] > before[3]  # one more tested, and it landed


def test_goodput_speculates_only_when_it_beats_plain_decoding_by_its_margin() -> None:
    """One draft at ~0.5 acceptance would make the step ~3% better than plain decoding: within
    the estimates' noise (the allocation is a maximum over noisy estimates, biased upward),
    so goodput decodes plainly; without the margin it takes the draft."""
    marginal = CostModel.from_coefficients({"intercept": 0.010, "rows": 0.0084})
    cautious = GoodputPolicy(context(marginal))
    eager = GoodputPolicy(context(marginal), margin=0.0)
    for policy in (cautious, eager):
        teach(policy, {"r0": 0.5})
    assert eager.allocate(base(1), requests(1), [8]) == [1]
    assert cautious.allocate(base(1), requests(1), [8]) == [0]
    # The same margin decides whether free proposals are worth making at all.
    free = GoodputPolicy(context(marginal, free=True))
    teach(free, {"r0": 0.5})
    assert free.allocate(base(1), requests(1), [8]) == [0]
    with pytest.raises(ValueError, match="margin"):
        GoodputPolicy(context(marginal), margin=-0.1)


def test_goodput_prunes_weak_proposals_without_valuing_their_nodes() -> None:
    """Every node of a tree is worth at most its best first draft. When not even that would
    pay, select prunes every tree to its root without valuing node by node (the per-node
    work costs a batch-8 CPU step ~0.4 ms); when it could pay, the nodes are valued."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.004})
    policy = GoodputPolicy(context(cost, free=True))
    teach(policy, {"r0": 0.05, "r1": 0.05})
    reqs = requests(2)
    trees = [TokenTree.chain(9, [1, 2, 3]), TokenTree.chain(9, [4, 5])]
    valued: list[str] = []
    original = policy.tree_candidates

    def counting(request: Request, tree: TokenTree) -> object:
        valued.append(request.request_id)
        return original(request, tree)

    policy.tree_candidates = counting  # type: ignore[method-assign]
    pruned = policy.select(base(2), reqs, trees)
    assert [t.num_drafts for t in pruned] == [0, 0] and [t.root_token for t in pruned] == [9, 9]
    assert valued == []
    teach(policy, {"r0": 0.95, "r1": 0.95})
    kept = policy.select(base(2), reqs, trees)
    assert sum(t.num_drafts for t in kept) > 0 and valued == ["r0", "r1"]


def test_the_allocators_plain_step_follows_the_base_and_each_refit() -> None:
    cost = CostModel(window=64, refit_every=1)
    cost.add_profile([(StepShape(1, 1, 10, 1), 0.010), (StepShape(4, 4, 40, 4), 0.016)] * 3)
    policy = GoodputPolicy(context(cost, free=True))
    first = policy.allocator.plain(base(2))
    assert policy.allocator.plain(base(2)) is not first  # another base object: recomputed
    # ... and priced for that base, not served from the last one.
    assert policy.allocator.plain(base(4)).predicted_seconds > first.predicted_seconds
    b = base(2)
    assert policy.allocator.plain(b) is policy.allocator.plain(b)
    before = policy.allocator.plain(b).predicted_seconds
    for _ in range(8):  # the cost doubles: the refit moves plain decoding's price with it
        cost.observe(StepShape(2, 2, 200, 2), 2 * before)
    assert policy.allocator.plain(b).predicted_seconds > 1.5 * before


def finishing_together(batch: list[Request], left: int, runner_up: int = 0) -> StepBase:
    """The step of an offline batch with nothing waiting: ``left`` = the most output tokens
    any of its requests may still produce, ``runner_up`` the most any other may."""
    return replace(
        base(len(batch)), most_remaining_tokens=left, runner_up_remaining_tokens=runner_up
    )


def requests_with_tokens_left(left: list[int]) -> list[Request]:
    return [
        Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=n), frozenset(), 10_000)
        for i, n in enumerate(left)
    ]


def test_a_batch_that_finishes_together_speculates_only_where_its_finish_is() -> None:
    """Eight requests with equally good drafts: served, each one's tokens count and all of
    them speculate; in an offline batch the one with 40 tokens left sets when the batch is
    done, the others finish in time without drafts, so only it speculates."""
    cost = CostModel.from_coefficients({"intercept": 0.010, "rows": 0.002})
    policy = GoodputPolicy(context(cost))
    teach(policy, {f"r{i}": 0.9 for i in range(8)})
    batch = requests_with_tokens_left([40] + [20] * 7)
    served = policy.allocate(base(8), batch, [8] * 8)
    assert all(b > 0 for b in served)
    offline = GoodputPolicy(context(cost))
    teach(offline, {f"r{i}": 0.9 for i in range(8)})
    budgets = offline.allocate(finishing_together(batch, 40), batch, [8] * 8)
    assert budgets[0] > 0 and budgets[1:] == [0] * 7


def test_the_last_request_of_a_batch_drafts_what_per_step_goodput_would_not() -> None:
    """Drafts accepted 40% of the time: served, a draft row (2 ms) in a batch of 8 (26 ms)
    would have to be accepted 62% of the time to raise the step's tokens per second, so none
    pays. At an offline batch's finish, the one request with the most left runs its last
    steps alone (12 ms each): a draft that lands brings the batch's end 12 ms closer, worth
    its 2 ms at 17% acceptance, so it drafts; the other seven finish in time without."""
    cost = CostModel.from_coefficients({"intercept": 0.010, "rows": 0.002})
    alphas = {f"r{i}": 0.4 for i in range(8)}
    batch = requests_with_tokens_left([40] + [20] * 7)
    served = GoodputPolicy(context(cost))
    teach(served, alphas)
    assert served.allocate(base(8), batch, [8] * 8) == [0] * 8
    offline = GoodputPolicy(context(cost))
    teach(offline, alphas)
    budgets = offline.allocate(finishing_together(batch, 40), batch, [8] * 8)
    assert budgets[0] > 0 and budgets[1:] == [0] * 7


def test_a_leader_drafts_no_further_than_its_lead() -> None:
    """With drafts accepted 90% of the time a lone leader would draft a long chain, but with
    2 tokens more left than the runner-up, tokens past those 2 leave the batch's finish where
    the runner-up puts it: at most 2 drafts."""
    cost = CostModel.from_coefficients({"intercept": 0.010, "rows": 0.001})
    batch = requests_with_tokens_left([40] + [38] * 7)
    far = GoodputPolicy(context(cost))
    teach(far, {f"r{i}": 0.9 for i in range(8)})
    assert far.allocate(finishing_together(batch, 40), batch, [8] * 8)[0] > 2
    near = GoodputPolicy(context(cost))
    teach(near, {f"r{i}": 0.9 for i in range(8)})
    budgets = near.allocate(finishing_together(batch, 40, runner_up=38), batch, [8] * 8)
    assert 0 < budgets[0] <= 2 and budgets[1:] == [0] * 7


def test_a_leader_coming_ahead_alone_saves_its_row_not_a_share_of_the_final_step() -> None:
    """Eight requests with the same tokens left finish together: the batch ends a step
    earlier only when all eight come ahead. A step costs 24 ms + 2 ms a row (a CPU's large
    fixed cost). With one proposal among them (accepted 80% of the time), the leader that
    would come ahead alone takes only its row (2 ms) out of the last step, less than its
    draft adds now: none is verified (valued at a share of the final step, 5 ms, it was).
    With every leader proposing alike, most of them are expected to come ahead and the
    rest of the final step with them: they draft."""
    cost = CostModel.from_coefficients({"intercept": 0.024, "rows": 0.002})
    batch = requests_with_tokens_left([40] * 8)
    alphas = {f"r{i}": 0.8 for i in range(8)}
    empty = TokenTree.root_only(0)
    chain = TokenTree.chain(0, [5, 6])

    alone = GoodputPolicy(context(cost, free=True))
    teach(alone, alphas)
    step = finishing_together(batch, 40)
    assert alone.allocate(step, batch, [8] * 8) == [8] * 8  # worth proposing: it may pay
    kept = alone.select(step, batch, [chain] + [empty] * 7)
    assert [t.num_drafts for t in kept] == [0] * 8

    together = GoodputPolicy(context(cost, free=True))
    teach(together, alphas)
    step = finishing_together(batch, 40)
    assert together.allocate(step, batch, [8] * 8) == [8] * 8
    kept = together.select(step, batch, [chain] * 8)
    assert sum(t.num_drafts > 0 for t in kept) >= 4


def test_a_model_drafters_leader_is_valued_by_the_others_first_drafts_too() -> None:
    """The same valuation where budgets come before drafting (model drafters): the leaders'
    first chain positions stand for their proposals. r0's drafts land 80% of the time, the
    seven other leaders' 2%: r0 would come ahead alone, so it gets no budget; with all eight
    at 80% they draft."""
    cost = CostModel.from_coefficients({"intercept": 0.024, "rows": 0.002})
    batch = requests_with_tokens_left([40] * 8)
    alone = GoodputPolicy(context(cost))
    teach(alone, {"r0": 0.8} | {f"r{i}": 0.02 for i in range(1, 8)})
    assert alone.allocate(finishing_together(batch, 40), batch, [8] * 8) == [0] * 8
    together = GoodputPolicy(context(cost))
    teach(together, {f"r{i}": 0.8 for i in range(8)})
    budgets = together.allocate(finishing_together(batch, 40), batch, [8] * 8)
    assert sum(b > 0 for b in budgets) >= 4


def test_a_batch_is_not_revalued_for_a_few_steps_while_valuing_saves_less_than_it_costs() -> None:
    """Valuing a step's drafts takes time (~1 ms of a CPU step). While it has saved less
    than that (here: nothing, every choice plain), a plain choice keeps the same batch plain
    for three more steps without valuing, even if its drafts got better meanwhile; then it
    is valued again. A request joining or leaving ends the quiet steps at once. While
    valuing saves more than it costs, a plain choice is not followed by quiet steps."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    policy = GoodputPolicy(context(cost))
    teach(policy, {"r0": 0.02, "r1": 0.02})
    pair = requests(2)
    assert policy.allocate(base(2), pair, [8, 8]) == [0, 0]
    teach(policy, {"r0": 0.95, "r1": 0.95})
    for _ in range(3):
        assert policy.allocate(base(2), pair, [8, 8]) == [0, 0]
    assert all(policy.allocate(base(2), pair, [8, 8]))

    joined = GoodputPolicy(context(cost))
    teach(joined, {"r0": 0.02, "r1": 0.02})
    assert joined.allocate(base(2), pair, [8, 8]) == [0, 0]
    teach(joined, {"r0": 0.95, "r1": 0.95, "r2": 0.95})
    assert all(joined.allocate(base(3), requests(3), [8, 8, 8]))

    paying = GoodputPolicy(context(cost))
    teach(paying, {"r0": 0.95, "r1": 0.95})
    for _ in range(4):
        assert all(paying.allocate(base(2), pair, [8, 8]))  # each saves ~tens of ms
    teach(paying, {"r0": 0.02, "r1": 0.02})
    assert paying.allocate(base(2), pair, [8, 8]) == [0, 0]
    teach(paying, {"r0": 0.95, "r1": 0.95})
    assert all(paying.allocate(base(2), pair, [8, 8]))


def _valued_steps(policy: GoodputPolicy, batch: list[Request], steps: int) -> list[int]:
    """The steps (of ``steps`` in a row, same batch) in which the policy valued drafts."""
    valued = []
    for step in range(steps):
        policy.allocate(base(len(batch)), batch, [8] * len(batch))
        if not policy.quiet:
            valued.append(step)
    return valued


def test_quiet_spells_double_while_valuing_keeps_choosing_plain_decoding() -> None:
    """Each valuation in a row that chooses plain decoding again doubles the next quiet
    spell (3, 6, 12, then at most 24 steps), so a batch whose drafts never pay is valued in
    a few steps of fifty. Drafts that got better meanwhile wait for the spell's end; once
    valuing has saved more than it cost, plain choices are valued every step again."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    policy = GoodputPolicy(context(cost))
    teach(policy, {"r0": 0.02, "r1": 0.02})
    pair = requests(2)
    assert _valued_steps(policy, pair, 75) == [0, 4, 11, 24, 49, 74]

    drafting = GoodputPolicy(context(cost))
    teach(drafting, {"r0": 0.02, "r1": 0.02})
    assert _valued_steps(drafting, pair, 5) == [0, 4]  # then 6 quiet steps
    teach(drafting, {"r0": 0.95, "r1": 0.95})
    assert [any(drafting.allocate(base(2), pair, [8, 8])) for _ in range(7)] == [False] * 6 + [True]
    teach(drafting, {"r0": 0.02, "r1": 0.02})
    assert _valued_steps(drafting, pair, 5) == [0, 1, 2, 3, 4]  # valuing has paid

    steady = GoodputPolicy(context(cost))
    steady.quiet_growth = 1
    teach(steady, {"r0": 0.02, "r1": 0.02})
    assert _valued_steps(steady, pair, 13) == [0, 4, 8, 12]


def test_what_valuing_saved_at_one_batch_size_does_not_keep_another_valued() -> None:
    """Valuing pays at batch 1 (a lone request's drafts ride nearly free) and rarely at
    batch 8, so what it cost and saved is averaged per batch size (powers of two): savings
    at batch 1 do not keep a batch of 8 whose drafts do not pay from going quiet."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.002})
    policy = GoodputPolicy(context(cost))
    teach(policy, {"r0": 0.95})
    lone = requests(1)
    for _ in range(10):
        assert policy.allocate(base(1), lone, [8]) != [0]  # each saves ~tens of ms
    eight = requests(8)
    teach(policy, {r.request_id: 0.02 for r in eight})
    assert _valued_steps(policy, eight, 5) == [0, 4]
    teach(policy, {"r0": 0.95})
    assert policy.allocate(base(1), lone, [8]) != [0]


class _BaseRecorder:
    """A policy that records the step bases it is given and never speculates."""

    learns_acceptance = False
    quiet = False

    def __init__(self) -> None:
        self.bases: list[StepBase] = []

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        self.bases.append(base)
        return [0] * len(caps)


def test_the_engine_marks_a_batch_that_finishes_together_only_while_nothing_waits() -> None:
    batch = requests_with_tokens_left([30, 12])
    for r in batch:
        r.append_output_token(9)
        r.num_computed_tokens = r.num_tokens - 1  # decoding: its last token to compute
    got = []
    for finish_together, waiting in ((True, 0), (True, 1), (False, 0)):
        recorder = _BaseRecorder()
        speculator = Speculator(NgramDrafter(), recorder, 8, finish_together=finish_together)  # type: ignore[arg-type]
        plan = StepPlan(
            batch,
            {r.request_id: 1 for r in batch},
            spec_budgets={r.request_id: 4 for r in batch},
            num_waiting=waiting,
        )
        speculator.fill(plan)
        marked = recorder.bases[0]
        got.append((marked.most_remaining_tokens, marked.runner_up_remaining_tokens))
    assert got == [(29, 11), (None, 0), (None, 0)]  # less the one output token made


def _proposal() -> TokenTree:
    """root 0 -> 5 (node 1) -> 6 (node 2) -> 7 (node 3); 5 -> 9 (node 4); root -> 8 (node 5)."""
    return TokenTree((0, 5, 6, 7, 9, 8), (-1, 0, 1, 2, 1, 0), (0.0, 0.9, 0.9, 0.9, 0.2, 0.1))


def test_children_pruned_below_an_accepted_path_are_scored_by_the_next_token() -> None:
    """The policy kept 0 -> 5 of the proposal, and 5 was accepted: the token emitted after it
    (6) says whether each pruned child of 5 would have been accepted (6 yes, 9 no). Only those
    children are tested; the path to 5 was counted with the verified tree."""
    proposal = _proposal()
    kept = proposal.subtree([1])
    outcome = pruned_children_scored(VerifiedTree("r", kept, (1,)), proposal, [5, 6])
    assert outcome is not None and outcome.tree is proposal
    assert outcome.tested == (2, 4) and outcome.accepted_nodes == (1, 2)
    missed = pruned_children_scored(VerifiedTree("r", kept, (1,)), proposal, [5, 3])
    assert missed is not None and missed.tested == (2, 4) and missed.accepted_nodes == (1,)


def test_pruned_children_are_not_scored_when_the_outcome_says_nothing_of_them() -> None:
    proposal = _proposal()
    # A kept child of the path's end was rejected: the emitted token is a residual sample.
    kept = proposal.subtree([1, 2])
    assert pruned_children_scored(VerifiedTree("r", kept, (1,)), proposal, [5, 7]) is None
    # Nothing accepted at all (the root's kept child was rejected).
    assert pruned_children_scored(VerifiedTree("r", kept, ()), proposal, [4]) is None
    # The request stopped with the path's last token (no token after it).
    stopped = VerifiedTree("r", proposal.subtree([1]), (1,))
    assert pruned_children_scored(stopped, proposal, [5]) is None
    # The path's end has no children in the proposal either.
    whole_chain = VerifiedTree("r", proposal.subtree([1, 2, 3]), (1, 2, 3))
    assert pruned_children_scored(whole_chain, proposal, [5, 6, 7, 1]) is None


def test_goodput_learns_depth_two_from_proposals_it_cut_to_depth_one() -> None:
    """Goodput once saw every second draft rejected, so it keeps only the first draft of each
    proposal. When the traffic turns (every draft lands now), the speculator scores the pruned
    second draft against the token emitted after the accepted first one: the depth-2
    calibration recovers without the policy verifying it, and the policy keeps depth 2 again.
    Without those free tests its depth-2 estimate would never move."""
    cost = CostModel.from_coefficients({"intercept": 0.02, "rows": 0.004})
    policy = GoodputPolicy(
        PolicyContext(8, free_proposals=True, score_edges=NgramDrafter.score_edges, cost_model=cost)
    )
    for _ in range(200):  # 4-token matches: first drafts land, second ones never do
        policy.estimator.observe("primer", TokenTree.chain(0, [5, 6], [4.0, 4.0]), (1,))
    speculator = Speculator(NgramDrafter(), policy, 8)
    # ... 9 7 8 9 occurred before, followed by 7 8: a 4-token match proposing 7 8 9 ...
    r = Request("r", [7, 8, 9, 7, 8, 9, 7, 8], SamplingParams(), frozenset(), 10_000)
    r.append_output_token(9)
    r.num_computed_tokens = r.num_tokens - 1
    kept_depths = []
    for _ in range(60):
        plan = StepPlan([r], {"r": 1}, spec_budgets={"r": 8})
        speculator.fill(plan)
        tree = plan.spec_trees.get("r")
        kept_depths.append(0 if tree is None else tree.max_depth)
        if tree is None:
            speculator.observe(plan, RunnerOutput(sampled_token_ids={"r": [7]}), 0.02)
            continue
        # Every kept draft lands, and the next token continues the repetition.
        path = list(range(1, tree.max_depth + 1))
        emitted = [tree.token_ids[i] for i in path] + [[7, 8, 9][tree.max_depth % 3]]
        output = RunnerOutput(sampled_token_ids={"r": emitted}, spec_accepted_nodes={"r": path})
        speculator.observe(plan, output, 0.02)
    assert kept_depths[0] == 1  # the stale depth-2 estimate cut the first proposals
    assert max(kept_depths[-10:]) >= 2
