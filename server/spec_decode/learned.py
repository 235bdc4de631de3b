"""What the cost-aware policies share: the online cost model, acceptance estimates, and the
bookkeeping of predicted against measured step times.

``goodput`` and ``smartspec_uniform`` differ only in how they turn estimates into budgets;
learning from each step is the same for both, so a comparison between them is fair.
"""

from __future__ import annotations

import math

import numpy as np

from server.engine.request import Request
from server.spec_decode.acceptance import AcceptanceEstimator
from server.spec_decode.allocator import Allocator, DraftCost, RequestCandidates
from server.spec_decode.cost_model import CostModel
from server.spec_decode.policy import (
    PolicyContext,
    PolicyStats,
    StepObservation,
    growing_reservation,
)
from server.spec_decode.tree import TokenTree

# Running mean of catch-up rows per drafting request (model drafters), before any data.
_INITIAL_CATCHUP_ROWS = 2.0


class LearnedPolicy:
    name = "learned"
    learns_acceptance = True
    quiet = False

    def __init__(self, context: PolicyContext) -> None:
        self.context = context
        self.cost = context.cost_model or CostModel()
        self.estimator = AcceptanceEstimator(context.max_spec_tokens, context.score_edges)
        self._catchup_rows = _INITIAL_CATCHUP_ROWS
        self._predicted_steps = 0
        self._predicted_total = 0.0
        self._measured_total = 0.0
        self._last_goodput = 0.0
        self._allocator: Allocator | None = None

    # ---- candidates ---------------------------------------------------------------------

    @property
    def allocator(self) -> Allocator:
        """One allocator while the draft cost holds (it caches per step base)."""
        draft = DraftCost(not self.context.free_proposals, self._catchup_rows)
        if self._allocator is None or self._allocator.draft_cost != draft:
            self._allocator = Allocator(self.cost, draft)
        return self._allocator

    def chain_candidates(self, request: Request, cap: int) -> RequestCandidates:
        return RequestCandidates.chain(self.estimator.chain_probs(request.request_id, cap))

    def tree_candidates(
        self, request: Request, tree: TokenTree
    ) -> tuple[RequestCandidates, np.ndarray]:
        """(candidates in decreasing path value, the tree node of each candidate)."""
        values = self.estimator.path_values(request.request_id, tree)[1:]
        depths = np.asarray(tree.depths[1:])
        nodes = np.arange(1, tree.num_nodes)
        # Decreasing value, then shallower, then node order: parents come first.
        order = np.lexsort((nodes, depths, -values))
        position = np.empty(tree.num_nodes, dtype=np.int64)
        position[0] = -1
        position[nodes[order]] = np.arange(len(order))
        parents = position[np.asarray(tree.parents)[nodes[order]]]
        return RequestCandidates(values[order], parents, depths[order]), nodes[order]

    def reservation(self, cap: int, last_budget: int | None) -> int:
        return growing_reservation(cap, last_budget)

    # ---- learning -----------------------------------------------------------------------

    def observe(self, observation: StepObservation) -> None:
        predicted = self.cost.observe(observation.shape, observation.seconds)
        if observation.seconds > 0 and math.isfinite(observation.seconds):
            self._predicted_steps += 1
            self._predicted_total += predicted
            self._measured_total += observation.seconds
        shape = observation.shape
        if shape.num_draft_forwards and shape.num_spec_requests:
            # Draft rows = catch-up rows + (drafts - 1) per drafting request.
            later = observation.num_draft_tokens - shape.num_spec_requests
            catchup = max(shape.num_draft_rows - later, shape.num_spec_requests)
            per_request = catchup / shape.num_spec_requests
            self._catchup_rows = 0.9 * self._catchup_rows + 0.1 * per_request
        for v in (*observation.verified, *observation.shadowed):
            self.estimator.observe(v.request_id, v.tree, v.accepted_nodes, v.tested)
        self.estimator.release(observation.finished_request_ids)
        self.forget(observation.finished_request_ids)
        self.estimator.next_step()

    def forget(self, request_ids: frozenset[str]) -> None:
        """Subclasses drop their own per-request state here."""

    def record_goodput(self, goodput: float) -> None:
        self._last_goodput = goodput

    def stats(self) -> PolicyStats:
        return PolicyStats(
            name=self.name,
            num_predicted_steps=self._predicted_steps,
            predicted_seconds_total=self._predicted_total,
            measured_seconds_total=self._measured_total,
            estimated_goodput=self._last_goodput,
            cost_model_relative_error=self.cost.recent_relative_error,
            cost_model_coefficients=self.cost.coefficients,
            acceptance_by_depth=self.estimator.global_probs(),
        )
