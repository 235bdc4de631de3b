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
"""

from __future__ import annotations

import numpy as np

from server.engine.request import Request
from server.spec_decode.allocator import Allocation, RequestCandidates, StepBase
from server.spec_decode.learned import LearnedPolicy
from server.spec_decode.policy import PolicyContext
from server.spec_decode.tree import TokenTree

_HYSTERESIS = 0.02
_MARGIN = 0.05


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
        self._previous: dict[str, int] = {}

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        if self.context.free_proposals:
            # Propose everything and let select() keep what is worth verifying, unless not
            # even the best possible first draft of any request would pay for its row (a
            # compute-bound batch): then skip proposing too (it is cheap, not free).
            best_case = self._best_case(base, requests)
            if not self._pays(base, best_case):
                self._decode_plainly(base, requests)
                return [0] * len(requests)
            return list(caps)
        candidates = [self.chain_candidates(r, c) for r, c in zip(requests, caps, strict=True)]
        return self.choose(base, requests, candidates).counts

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]:
        if not any(t.num_drafts for t in trees):
            # Nothing proposed (no match: about half the steps of a chat at batch 1): nothing
            # to choose, and pricing the empty allocation would cost the step ~0.3 ms.
            self._previous.update((r.request_id, 0) for r in requests)
            return trees
        if not self._pays(base, self._upper_bound(base, requests, trees)):
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
        best_case = [
            RequestCandidates.chain([self.estimator.best_first_prob(r.request_id)])
            for r in requests
        ]
        return self.allocator.best(base, best_case)

    def _upper_bound(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> Allocation:
        """The best allocation (searched as ``choose`` searches) if every node of each tree
        were worth the tree's best first draft, which no node is worth more than: when it
        does not pay, no pruning of the real trees is expected to. Equal values are broken by
        request (a hair less for each later one), so ties put drafts in fewer verifying
        requests, the cheaper way."""
        bounds = []
        for i, (r, t) in enumerate(zip(requests, trees, strict=True)):
            n = t.num_drafts
            value = self.estimator.first_draft_prob(r.request_id, t) - 1e-9 * i
            depths = np.arange(1, n + 1)
            bounds.append(RequestCandidates(np.full(n, value), depths - 2, depths))
        largest = max(t.num_drafts for t in trees)
        return self.allocator.best(base, bounds, uniform_ks=range(1, largest + 1))

    def _decode_plainly(self, base: StepBase, requests: list[Request]) -> None:
        """No speculation this step: every budget is 0 and the estimate is plain decoding's."""
        self._previous.update((r.request_id, 0) for r in requests)
        self.record_goodput(self.allocator.plain(base).goodput)

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
        self.record_goodput(best.goodput)
        return best

    def forget(self, request_ids: frozenset[str]) -> None:
        for rid in request_ids:
            self._previous.pop(rid, None)
