"""specd's goodput policy: every request's budget chosen every step by marginal value.

Model drafters (each draft token costs a draft forward) get budgets before drafting: chain
position j of request i is worth prod_{d <= j} p_i(d), the request's own conditional
acceptance by depth. Model-free drafters propose up to each request's cap (it costs
microseconds), and the policy then keeps the tree nodes worth verifying: a node is worth the
probability that its whole path is accepted, from the drafter's calibrated scores and the
request's record. Either way the batch-wide allocation is ``Allocator.best``: the most
expected tokens per predicted second, so budgets fall to 0 when verify rows cost more than
they return (a compute-bound batch, poor drafts) and grow into long chains or wide trees when
the machine has compute to spare.

Hysteresis: the previous step's per-request counts are kept while their predicted goodput is
within ``hysteresis`` of the best, so budgets do not flap between near-equal allocations.

Margin: a step speculates only when its predicted goodput beats plain decoding's by
``margin`` (SmartSpec gives k = 0 a 1.1x margin; ours is smaller because our estimates are
per node). Why: the allocation is the maximum over many noisy estimates, so it is biased
upward (the winner's curse). Measured on chat prompts at batch 8 on a 2-core CPU, where a
draft row costs about as much as a request's decode row: the verified drafts' expected tokens
were 1.5-1.7x those accepted (on repetitive prompts 1.04x: 802 expected, 771 accepted); a
gain the policy predicts at a few percent is within that error.

A batch that finishes together (offline ``generate``, nothing waiting: the engine sets
``StepBase.most_remaining_tokens``) is done when its last request is. Per-step goodput counts
every request's tokens alike, which served traffic wants (a request that finishes early is
latency returned and a slot for the next), but here a request with fewer tokens left than the
most any request has left will finish in time without drafts, and its drafts only make the
steps they ride in slower. Measured on the mix at batch 8 on a 2-core CPU: goodput and no
speculation both took 63 steps (a chat request that barely speculates set it), and goodput's
drafts made them 15% slower in all. So while the batch finishes together only the n requests
with the most tokens left may speculate, and a draft of theirs is worth the time it saves at
the end: the batch's last steps run those n alone, and an accepted draft brings the finish
1/n of such a step closer. A draft pays when p * T(final step) / n beats the time it adds
now, which for n = the whole batch (its start) is per-step goodput again. Only up to the
lead over the runner-up, though: once the leaders are down to the next request's count, the
finish is that request's, and their further tokens bring it no closer. The estimated
goodput then counts tokens in those units.

T(final step) / n is what a token saves only when every leader comes ahead: a leader that
comes ahead alone takes its row out of the last step, T(n) - T(n - 1), and the rest of the
step (on a CPU most of it: 24 of 35 ms at 8 rows) goes only when all n do. So once the
proposals are in, a draft is worth the marginal row plus that rest in the share of the
leaders expected to come ahead this step (the mean over the leaders of their best first
draft's estimate, 0 without one): a step later the ones that came ahead are no longer
leaders, and the others' drafts are valued alike. The marginal row is the chord of T over
the upper half of the leaders' count (the fit's slope between two neighbouring counts may
dip). Measured on chat prompts at batch 8 on a 2-core CPU: valued at T / n, goodput drafted
for a few leaders with long prompt matches in the batch's first steps (4 drafts, all
accepted, for 12 ms more in that step), the others never came ahead, and all 64 steps still
ran, so every draft was a loss. Valued this way it drafted 25-55% fewer tokens there
(back to back, ten runs a cell); the time saved is within the runs' noise (~1%).

Quiet steps: valuing a step's drafts (pricing the best case, proposing, bounding and pruning
the proposals) costs time too: ~1 ms of a ~39 ms step on chat prompts at batch 8 on a 2-core
CPU, where nearly every step then decodes plainly. So the policy keeps two running averages
over the steps it values (about the last 50), per batch size (1, 2-3, 4-7, 8-15, ...): the
seconds valuing took, and the seconds its choice was predicted to save (the time plain
decoding would take for the chosen allocation's expected tokens, less the allocation's; 0
for a plain choice). While valuing saves less than it costs, a batch that chose plain
decoding keeps it for the next ``_QUIET_STEPS`` steps, while no request joins or leaves,
before its drafts are valued again (SmartSpec re-chooses its k every few steps for the same
reason), and each valuation in a row that chooses plain again doubles the spell, up to
``_QUIET_GROWTH`` times (3, 6, 12, 24 steps): a batch whose drafts do not pay is then valued
in ~5 of 64 steps instead of 16. Per batch size, because whether drafts pay depends on it
most: a lone request's drafts ride nearly free and a batch of 8's cost as much as a
request's own row, so savings at batch 1 kept a later batch of 8 valued for its first ~60
steps (all of an offline batch's). The memory is long because drafts that pay come in
bursts (a phrase copied from the prompt): averaged over ~5 valued steps, a lone chat request
went quiet between bursts and missed their starts (2-3% slower than valuing every step, back
to back, while batch 8 gained 1-3%); over ~50 it ran as fast as valuing every step. The
predicted savings are optimistic (see the margin above), so this errs towards valuing. The
drafter's first drafts teach the estimator meanwhile (the engine's shadow drafts, one
request a quiet step), so a request that turns repetitive is seen at the spell's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from server.engine.request import Request
from server.spec_decode.allocator import Allocation, RequestCandidates, StepBase
from server.spec_decode.cost_model import StepShape
from server.spec_decode.learned import LearnedPolicy
from server.spec_decode.policy import PolicyContext
from server.spec_decode.tree import TokenTree

_HYSTERESIS = 0.02
_MARGIN = 0.05
# Steps a batch that chose plain decoding keeps it, while no request joins or leaves, before
# the policy values its drafts again (see the module docstring).
_QUIET_STEPS = 3
# Each valuation in a row that chooses plain decoding again doubles the quiet steps, up to
# this many times the first (see the module docstring).
_QUIET_GROWTH = 8
# Decay of the running averages of what valuing a step costs and saves (per valued step).
_VALUING_DECAY = 0.98


@dataclass(frozen=True)
class _Finish:
    """How a step's tokens are valued while its batch finishes together (see the module
    docstring): ``base`` as the engine gave it, the predicted seconds of this step (``now``)
    and, per leader, of a final step (``share`` = T(n) / n) and of its row alone
    (``marginal``), over ``leaders`` = n."""

    base: StepBase
    now: float
    share: float
    marginal: float
    leaders: int

    def valued(self, coming_ahead: float) -> StepBase:
        """The base with its plain tokens counted in units of the seconds a token saves at
        the finish, when a share ``coming_ahead`` of the leaders is expected to come ahead:
        a draft then pays when p x saved beats the time it adds now."""
        saved = self.marginal + (self.share - self.marginal) * coming_ahead
        # Nothing saved (a flat price over the leaders' count, no leader with a draft): no
        # draft can pay; a tiny saving keeps the units finite.
        saved = max(saved, 1e-6 * self.share)
        return replace(self.base, emitted_tokens=self.now / saved)


class GoodputPolicy(LearnedPolicy):
    name = "goodput"

    def __init__(
        self, context: PolicyContext, hysteresis: float = _HYSTERESIS, margin: float = _MARGIN
    ) -> None:
        super().__init__(context)
        if not 0.0 <= hysteresis < 1.0:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        if margin < 0.0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.hysteresis = hysteresis
        self.margin = margin
        self.quiet_steps = _QUIET_STEPS  # 0 turns quiet steps off (for A/B runs)
        self.quiet_growth = _QUIET_GROWTH  # 1 keeps every quiet spell at quiet_steps
        self._previous: dict[str, int] = {}
        # While a batch finishes together, how this step's tokens are valued (allocate() sets
        # it, select() reads it).
        self._finish: _Finish | None = None
        # This step's batch (request ids), and the quiet spell: the batch it keeps plain, the
        # spell's length (which the batch's next plain choice doubles) and its steps left.
        self._batch: tuple[str, ...] = ()
        self._spell: tuple[tuple[str, ...], int, int] = ((), 0, 0)
        # When this step's valuing began, and per batch size (by powers of two) running
        # averages of the seconds valuing a step took and its choice was predicted to save.
        self._valuing_since = 0.0
        self._valuing: dict[int, tuple[float, float]] = {}

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        self._batch = tuple(r.request_id for r in requests)
        spell_batch, length, left = self._spell
        self.quiet = left > 0 and spell_batch == self._batch
        if self.quiet:
            self._spell = (spell_batch, length, left - 1)
            return [0] * len(requests)
        self._valuing_since = time.perf_counter()
        valued, caps = self._toward_the_finish(base, requests, caps)
        if not any(caps):
            self._decode_plainly(valued, requests)
            return [0] * len(requests)
        if self.context.free_proposals:
            # Propose everything and let select() keep what is worth verifying, unless not
            # even the best possible first draft of any request would pay for its row (a
            # compute-bound batch): then skip proposing too (it is cheap, not free).
            speculating = [r for r, c in zip(requests, caps, strict=True) if c > 0]
            best_case = self._best_case(valued, speculating)
            if not self._pays(valued, best_case):
                self._decode_plainly(valued, requests)
                return [0] * len(requests)
            return list(caps)
        candidates = [self.chain_candidates(r, c) for r, c in zip(requests, caps, strict=True)]
        firsts = [float(c.values[0]) if c.size else 0.0 for c in candidates]
        return self.choose(self._finish_valued(base, firsts), requests, candidates).counts

    def _toward_the_finish(
        self, base: StepBase, requests: list[Request], caps: list[int]
    ) -> tuple[StepBase, list[int]]:
        """The step as this policy values it before the proposals (every leader expected to
        come ahead: the most a token can be worth), and the caps it may use: while the batch
        finishes together, only its requests with the most tokens left speculate, and only
        their tokens count (see the module docstring)."""
        self._finish = None
        left = base.most_remaining_tokens
        if left is None:
            return base, caps
        last = [r for r in requests if r.num_tokens_left >= left]
        if not last:
            return replace(base, emitted_tokens=0), [0] * len(caps)
        # The batch's last steps run these requests alone, at their context by then.
        n = len(last)
        kv = sum(r.num_computed_tokens + 1 + left for r in last)
        final = self.cost.predict(StepShape(n, n, kv, n))
        share = final / n
        marginal = share
        if n > 1:
            half = (n + 1) // 2
            fewer = self.cost.predict(StepShape(half, half, kv * half // n, half))
            marginal = min(max((final - fewer) / (n - half), 0.0), share)
        now = self.cost.predict(base.decode_shape or base.shape)
        self._finish = _Finish(base, now, share, marginal, n)
        # Past the runner-up's count the finish is the runner-up's: a leader's tokens beyond
        # that lead do not bring it closer (in a batch that moves in step, the lead is 1-3).
        lead = left - base.runner_up_remaining_tokens
        ids = {r.request_id for r in last}
        caps = [
            min(c, lead) if r.request_id in ids else 0 for r, c in zip(requests, caps, strict=True)
        ]
        return self._finish.valued(1.0), caps

    def _finish_valued(self, base: StepBase, firsts: list[float]) -> StepBase:
        """``base`` as valued once the drafting leaders' best first-draft estimates
        (``firsts``) are known: while the batch finishes together, a token is worth the
        marginal row plus the rest of a final step's share in the proportion of leaders
        expected to come ahead (see the module docstring); otherwise ``base`` itself."""
        finish = self._finish
        if finish is None or finish.base is not base:
            return base
        return finish.valued(min(sum(firsts) / finish.leaders, 1.0))

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]:
        if not any(t.num_drafts for t in trees):
            # Nothing proposed (no match: about half the steps of a chat at batch 1): nothing
            # to choose, and pricing the empty allocation would cost the step ~0.3 ms.
            self._previous.update((r.request_id, 0) for r in requests)
            self._decided(saved_seconds=0.0)
            return trees
        firsts = [
            self.estimator.first_draft_prob(r.request_id, t)
            for r, t in zip(requests, trees, strict=True)
        ]
        base = self._finish_valued(base, firsts)
        if not self._pays(base, self._upper_bound(base, trees, firsts)):
            # Not even with every node worth its tree's best first draft: prune everything
            # without valuing each node (on chat prompts at batch 8 most steps end here).
            self._decode_plainly(base, requests)
            return [TokenTree.root_only(t.root_token) for t in trees]
        built = [self.tree_candidates(r, t) for r, t in zip(requests, trees, strict=True)]
        allocation = self.choose(base, requests, [c for c, _ in built])
        pruned = []
        for tree, (_, nodes), n in zip(trees, built, allocation.counts, strict=True):
            pruned.append(tree if n == tree.num_drafts else tree.subtree(nodes[:n].tolist()))
        return pruned

    def _best_case(self, base: StepBase, requests: list[Request]) -> Allocation:
        """The best allocation if every request's first draft were as likely as its best
        first draft has been: no draft in it means none can pay this step."""
        best_first = [self.estimator.best_first_prob(r.request_id) for r in requests]
        return self.allocator.best_first_drafts(base, best_first)

    def _upper_bound(
        self, base: StepBase, trees: list[TokenTree], firsts: list[float]
    ) -> Allocation:
        """The best allocation (searched as ``choose`` searches) if every node of each tree
        were worth the tree's best first draft (``firsts``), which no node is worth more
        than: when it does not pay, no pruning of the real trees is expected to. Equal values
        are broken by request (a hair less for each later one), so ties put drafts in fewer
        verifying requests, the cheaper way."""
        bounds = []
        for i, (t, first) in enumerate(zip(trees, firsts, strict=True)):
            n = t.num_drafts
            value = first - 1e-9 * i
            depths = np.arange(1, n + 1)
            bounds.append(RequestCandidates(np.full(n, value), depths - 2, depths))
        largest = max(t.num_drafts for t in trees)
        return self.allocator.best(base, bounds, uniform_ks=range(1, largest + 1))

    def _decode_plainly(self, base: StepBase, requests: list[Request]) -> None:
        """No speculation this step (nor the next quiet steps): every budget is 0 and the
        estimate is plain decoding's."""
        self._previous.update((r.request_id, 0) for r in requests)
        self.record_goodput(self.allocator.plain(base).goodput)
        self._decided(saved_seconds=0.0)

    def _decided(self, saved_seconds: float) -> None:
        """Ends a valued step: counts what valuing it cost and what its choice is predicted to
        save; a plain choice starts quiet steps while valuing costs more than it saves (see
        the module docstring)."""
        spent = time.perf_counter() - self._valuing_since
        keep = _VALUING_DECAY
        size = len(self._batch).bit_length()
        costs, saves = self._valuing.get(size, (0.0, 0.0))
        costs = keep * costs + (1.0 - keep) * spent
        saves = keep * saves + (1.0 - keep) * saved_seconds
        self._valuing[size] = (costs, saves)
        if saved_seconds > 0.0 or saves >= costs:
            self._spell = ((), 0, 0)
            return
        spell_batch, length, _ = self._spell
        steps = self.quiet_steps
        if spell_batch == self._batch and length > 0:
            steps = min(2 * length, self.quiet_growth * self.quiet_steps)
        self._spell = (self._batch, steps, steps)

    def _pays(self, base: StepBase, allocation: Allocation) -> bool:
        """Whether ``allocation`` drafts and beats plain decoding by the margin."""
        if not any(allocation.counts):
            return False
        plain = self.allocator.plain(base)
        return allocation.goodput >= plain.goodput * (1.0 + self.margin)

    def choose(
        self, base: StepBase, requests: list[Request], candidates: list[RequestCandidates]
    ) -> Allocation:
        allocator = self.allocator
        largest = max((c.size for c in candidates), default=0)
        best = allocator.best(base, candidates, uniform_ks=range(1, largest + 1))
        previous = [self._previous.get(r.request_id, 0) for r in requests]
        if previous != best.counts and self.hysteresis > 0:
            kept = allocator.evaluate(base, candidates, previous)
            if kept.goodput >= best.goodput * (1.0 - self.hysteresis):
                best = kept
        if any(best.counts) and not self._pays(base, best):
            plain = allocator.plain(base)  # priced in _pays already
            best = Allocation([0] * len(candidates), plain.expected_tokens, plain.predicted_seconds)
        for r, n in zip(requests, best.counts, strict=True):
            self._previous[r.request_id] = n
        saved = 0.0
        if any(best.counts):
            # Plain decoding's time for the expected tokens, less this allocation's.
            plain = allocator.plain(base)
            if plain.expected_tokens > 0:
                saved = best.expected_tokens / plain.goodput - best.predicted_seconds
        self._decided(saved_seconds=max(saved, 0.0))
        self.record_goodput(best.goodput)
        return best

    def forget(self, request_ids: frozenset[str]) -> None:
        for rid in request_ids:
            self._previous.pop(rid, None)
