"""The engine core's side of speculation, once per step: budgets, drafts, pruning, feedback.

``fill(plan)`` runs between schedule and execute. The scheduler has reserved token budget and
KV slots for each decoding request's drafts (``plan.spec_budgets``: its cap where the step
had room, else what ``reservation`` asked to hold before new prompts); the policy turns caps into
budgets, the drafter fills them, and for model-free drafters (which proposed up to the cap)
the policy prunes each tree to the nodes worth verifying. ``observe(...)`` runs after update
with the step's wall time and which nodes were accepted, and is where the policy learns.

The step's shape (``plan_shape``) is computed here, in one place, for the policy's cost model,
the start-up profile and the metrics alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request
from server.spec_decode.allocator import StepBase
from server.spec_decode.cost_model import StepShape
from server.spec_decode.drafter import (
    Drafter,
    DraftWork,
    StatefulDrafter,
    VerifiedTree,
    VerifiedTreeConsumer,
    implements,
)
from server.spec_decode.policy import PolicyStats, SpecPolicy, StepObservation
from server.spec_decode.tree import TokenTree

logger = logging.getLogger(__name__)

# Seconds between the policy's summary log lines.
_SUMMARY_INTERVAL_S = 30.0
# Shadow drafts per step at most (see Speculator._shadow_drafts), and in the policy's quiet
# steps.
_SHADOWS_PER_STEP = 4
_SHADOWS_PER_QUIET_STEP = 1


@dataclass
class SpeculationStats:
    """Cumulative, for /metrics: the policy's own numbers and the chosen budgets."""

    policy: PolicyStats
    # budget_counts[b] = (request, step) pairs that were given b draft tokens to verify,
    # over decoding requests that could speculate (cap > 0).
    budget_counts: list[int] = field(default_factory=list)
    budget_sum: int = 0
    # The drafter's learned state, per part: (bytes held, bytes allowed).
    drafter_memory: dict[str, tuple[int, int]] = field(default_factory=dict)


def step_base(plan: StepPlan) -> StepBase:
    """The plan without drafts: what it computes (all of it, and the decoding requests
    alone), and the tokens the decoding requests emit anyway."""
    num_tokens = kv = sampling = 0
    decoding = decode_kv = 0
    for r in plan.requests:
        n = plan.num_scheduled_tokens[r.request_id]
        num_tokens += n
        kv += r.num_computed_tokens + n
        sampling += plan.samples(r)
        if n == 1 and plan.samples(r) and r.num_computed_tokens >= r.num_prompt_tokens:
            decoding += 1
            decode_kv += r.num_computed_tokens + 1
    shape = StepShape(num_tokens, sampling, kv, len(plan.requests))
    decode_shape = StepShape(decoding, decoding, decode_kv, decoding)
    return StepBase(shape, decoding, decode_shape if decode_shape != shape else None)


def plan_shape(plan: StepPlan, work: DraftWork, base: StepBase | None = None) -> StepShape:
    """The plan's shape with its drafts (``plan.spec_trees``) and the drafter's work;
    ``base``: the plan's ``step_base`` if already computed this step."""
    drafts = sum(plan.num_spec_tokens.values())
    base_shape = (base or step_base(plan)).shape
    return base_shape.with_drafts(drafts, len(plan.spec_trees), work.forwards, work.rows)


class Speculator:
    def __init__(
        self,
        drafter: Drafter,
        policy: SpecPolicy,
        max_spec_tokens: int,
        finish_together: bool = False,
    ) -> None:
        """``finish_together``: the requests are returned together when the last one is done
        (offline ``generate``), so while none waits, the batch's finishing time is what a
        step's drafts can shorten (``StepBase.most_remaining_tokens``)."""
        if drafter.kind == "sampled" and drafter.free_proposals:
            # Pruning i.i.d.-sampled children changes the residual sequence of the SpecInfer
            # rule (see verify.py): such drafters must take their budgets before drafting.
            raise ValueError(f"drafter {drafter.name!r}: sampled drafts cannot be pruned")
        self.drafter = drafter
        self.policy = policy
        self.finish_together = finish_together
        self._budget_counts = [0] * (max_spec_tokens + 1)
        self._budget_sum = 0
        # This step's drafter work and draft-free base (fill computes them, observe reuses).
        self._work = DraftWork()
        self._base: StepBase | None = None
        # This step's shadow drafts (fill proposes them, observe scores them), and the step
        # each live request was last shadowed in.
        self._shadows: dict[str, TokenTree] = {}
        self._last_shadowed: dict[str, int] = {}
        # This step's proposals that the policy pruned (fill keeps them, observe scores the
        # pruned children of fully accepted paths: pruned_children_scored).
        self._pruned_proposals: dict[str, TokenTree] = {}
        self._num_steps = 0
        # Drafts each live request verified in the last step it could speculate.
        self._last_budgets: dict[str, int] = {}
        self._last_summary = time.monotonic()
        self._steps_since_summary = 0
        self._drafts_since_summary = 0
        self._accepted_since_summary = 0

    def reservation(self, request: Request, cap: int) -> int:
        """Draft slots the scheduler holds for ``request`` before admitting new prompts (the
        scheduler's ``draft_reservation``; the policy decides from the request's last budget)."""
        return self.policy.reservation(cap, self._last_budgets.get(request.request_id))

    def fill(self, plan: StepPlan) -> None:
        """Budgets, drafts and pruning for the plan's decoding requests (see the docstring)."""
        self._work = DraftWork()
        self._base = None
        self._shadows = {}
        self._pruned_proposals = {}
        self._num_steps += 1
        if not plan.spec_budgets:
            return
        plan.spec_draft_kind = self.drafter.kind
        requests = [r for r in plan.requests if r.request_id in plan.spec_budgets]
        caps = [plan.spec_budgets[r.request_id] for r in requests]
        base = step_base(plan)
        if self.finish_together and plan.num_waiting == 0:
            left = {r.num_tokens_left for r in plan.requests}
            most = max(left)
            runner_up = max(left - {most}, default=0)
            base = replace(base, most_remaining_tokens=most, runner_up_remaining_tokens=runner_up)
        self._base = base
        budgets = self.policy.allocate(base, requests, caps)
        budgets = [min(max(int(b), 0), c) for b, c in zip(budgets, caps, strict=True)]
        if self.drafter.free_proposals and self.policy.learns_acceptance:
            # Before the real proposals: a drafter may keep state of its last call.
            self._shadows = self._shadow_drafts(requests, budgets)
        drafting = [(r, b) for r, b in zip(requests, budgets, strict=True) if b > 0]
        trees = []
        if drafting:
            trees = self.drafter.propose([r for r, _ in drafting], [b for _, b in drafting])
            self._work = self.drafter.last_work
            if self.drafter.free_proposals:
                proposed = trees
                trees = self.policy.select(base, [r for r, _ in drafting], trees)
                if self.policy.learns_acceptance:
                    self._keep_pruned(drafting, proposed, trees)
        for (request, _), tree in zip(drafting, trees, strict=True):
            if tree.num_drafts > 0:
                rid = request.request_id
                plan.spec_trees[rid] = tree
                plan.num_spec_tokens[rid] = tree.num_drafts
                q = self.drafter.draft_probs(rid)
                if q is not None:
                    plan.spec_draft_probs[rid] = q
        for request in requests:
            used = plan.num_spec_tokens.get(request.request_id, 0)
            self._last_budgets[request.request_id] = used
            self._budget_counts[min(used, len(self._budget_counts) - 1)] += 1
            self._budget_sum += used

    def _shadow_drafts(self, requests: list[Request], budgets: list[int]) -> dict[str, TokenTree]:
        """The first draft a model-free drafter would propose for each request the policy gave
        no budget, left unverified. Why: a policy learns acceptance only from drafts it
        verifies, so once a few rejections (or a costly batch) bring every budget to 0 its
        estimates would never move again, even when the traffic changes (measured: on
        repetitive prompts at batch 1, one rejected first draft kept goodput from drafting
        in 240 of the next 248 steps). The token plain decoding emits next tells, for free,
        whether that draft would have been accepted (``observe``): for a deterministic draft
        the verify rule accepts exactly when sampling would have emitted its token.

        At most ``_SHADOWS_PER_STEP`` requests a step, those shadowed longest ago first: a
        sample is enough to keep the estimates moving, and proposing for every idle request
        of a large batch would cost a share of each step (SmartSpec measured n-gram proposals
        for a whole batch at 4% of an H100 step). One a step while the policy is quiet (it
        reads no estimate until its next valued step): four n-gram proposals cost ~0.15 ms,
        0.5% of a batch-8 step on a 2-core CPU, where goodput is quiet in most steps."""
        idle = [r for r, b in zip(requests, budgets, strict=True) if b == 0]
        if not idle:
            return {}
        most = _SHADOWS_PER_QUIET_STEP if self.policy.quiet else _SHADOWS_PER_STEP
        if len(idle) > most:
            idle.sort(key=lambda r: self._last_shadowed.get(r.request_id, -1))
            idle = idle[:most]
        for r in idle:
            self._last_shadowed[r.request_id] = self._num_steps
        trees = self.drafter.propose(idle, [1] * len(idle))
        return {r.request_id: t for r, t in zip(idle, trees, strict=True) if t.num_drafts > 0}

    def _keep_pruned(
        self,
        drafting: list[tuple[Request, int]],
        proposed: list[TokenTree],
        kept: list[TokenTree],
    ) -> None:
        """What the policy pruned from each proposal, for ``observe`` to score for free. A
        proposal pruned to nothing: its first drafts, shadowed like ``_shadow_drafts``'s. Why:
        the policy keeps only the nodes it already values, so without these its estimates
        would learn only from the proposals it liked (selection bias: measured at batch 1 on
        the mix, a 2-token-match bucket stayed at 0.03 after two samples while fixed k = 2
        accepted 0.66 tokens a step from the same drafter). A proposal pruned to a smaller
        tree: the whole proposal, whose children below a fully accepted kept path are scored
        (pruned_children_scored). The proposals exist already, so this costs nothing."""
        for (request, _), full, pruned in zip(drafting, proposed, kept, strict=True):
            if pruned.num_drafts == 0 and full.num_drafts > 0:
                first = [i for i in range(1, full.num_nodes) if full.parents[i] == 0]
                self._shadows[request.request_id] = full.subtree(first)
            elif pruned.num_drafts > 0 and full.num_nodes > pruned.num_nodes:
                self._pruned_proposals[request.request_id] = full

    def _scored_shadows(self, output: RunnerOutput) -> list[VerifiedTree]:
        """Each shadow draft (the root's children only), accepted when plain decoding
        emitted its token: the case of pruned_children_scored where nothing was kept."""
        scored = []
        for rid, tree in self._shadows.items():
            emitted = output.sampled_token_ids.get(rid)
            if emitted and rid not in output.failed:
                nothing_kept = VerifiedTree(rid, TokenTree.root_only(tree.root_token), ())
                outcome = pruned_children_scored(nothing_kept, tree, emitted)
                if outcome is not None:
                    scored.append(outcome)
        return scored

    def _scored_pruned_children(
        self, verified: list[VerifiedTree], output: RunnerOutput
    ) -> list[VerifiedTree]:
        """For each verified tree the policy had pruned: the pruned children below its
        accepted path, scored by the token emitted after the path (pruned_children_scored)."""
        scored = []
        for v in verified:
            full = self._pruned_proposals.get(v.request_id)
            emitted = output.sampled_token_ids.get(v.request_id)
            if full is not None and emitted:
                outcome = pruned_children_scored(v, full, emitted)
                if outcome is not None:
                    scored.append(outcome)
        return scored

    def observe(self, plan: StepPlan, output: RunnerOutput, seconds: float) -> None:
        verified = [
            VerifiedTree(rid, tree, tuple(output.spec_accepted_nodes[rid]))
            for rid, tree in plan.spec_trees.items()
            if rid in output.spec_accepted_nodes
        ]
        if implements(type(self.drafter), VerifiedTreeConsumer):
            self.drafter.observe_verified(verified)
        drafts = sum(plan.num_spec_tokens.values())
        for rid in plan.finished_request_ids:
            self._last_budgets.pop(rid, None)
            self._last_shadowed.pop(rid, None)
        self.policy.observe(
            StepObservation(
                shape=plan_shape(plan, self._work, self._base),
                seconds=seconds,
                verified=verified,
                shadowed=self._scored_shadows(output)
                + self._scored_pruned_children(verified, output),
                num_draft_tokens=drafts,
                finished_request_ids=frozenset(plan.finished_request_ids),
            )
        )
        self._steps_since_summary += 1
        self._drafts_since_summary += drafts
        self._accepted_since_summary += sum(len(v.accepted_nodes) for v in verified)
        now = time.monotonic()
        if now - self._last_summary >= _SUMMARY_INTERVAL_S:
            self._log_summary(now)

    def _log_summary(self, now: float) -> None:
        s = self.policy.stats()
        steps = max(self._steps_since_summary, 1)
        drafts = self._drafts_since_summary
        measured = s.measured_seconds_total / max(s.num_predicted_steps, 1)
        predicted = s.predicted_seconds_total / max(s.num_predicted_steps, 1)
        logger.info(
            "speculation (%s): %d steps in %.0f s, %.2f draft tokens/step, acceptance %.2f, "
            "step time predicted %.1f ms / measured %.1f ms (recent error %.1f%%), "
            "estimated goodput %.1f tok/s",
            s.name,
            self._steps_since_summary,
            now - self._last_summary,
            drafts / steps,
            self._accepted_since_summary / drafts if drafts else 0.0,
            1e3 * predicted,
            1e3 * measured,
            100 * s.cost_model_relative_error,
            s.estimated_goodput,
        )
        self._last_summary = now
        self._steps_since_summary = self._drafts_since_summary = 0
        self._accepted_since_summary = 0

    def stats(self) -> SpeculationStats:
        memory = self.drafter.memory() if isinstance(self.drafter, StatefulDrafter) else {}
        return SpeculationStats(
            self.policy.stats(), list(self._budget_counts), self._budget_sum, memory
        )


def pruned_children_scored(
    verified: VerifiedTree, proposed: TokenTree, emitted: list[int]
) -> VerifiedTree | None:
    """The children the policy pruned below the end of a fully accepted path, scored for free
    (None when there are none, or when the outcome says nothing about them).

    Why: the policy learns acceptance only from what it verifies. Once it keeps depth 1 alone,
    its depth-2 estimates never move again however good the drafts turn out (measured: ``auto``
    at batch 16 on cached answers, 96% of its depth-1 drafts accepted and not one depth-2 node
    kept in 400 drafts, while ``suffix`` learned to keep 2). When every kept node on the path
    was accepted and the path ends there, the token emitted after it is the target's own next
    token (plain sampling, no residual), so a deterministic child of that node would have been
    accepted exactly when it is that token, as for a shadow draft. ``verified.accepted_nodes``
    index the kept tree; the outcome indexes ``proposed``, with ``tested`` = the pruned
    children only (the path was counted with the verified tree).
    """
    kept, accepted = verified.tree, verified.accepted_nodes
    last = accepted[-1] if accepted else 0
    if any(kept.parents[i] == last for i in range(1, kept.num_nodes)):
        return None  # a kept child of it was rejected: the emitted token is a residual sample
    if len(emitted) <= len(accepted):
        return None  # the request stopped before a token after the path
    child_of = {
        (proposed.parents[i], proposed.token_ids[i]): i for i in range(1, proposed.num_nodes)
    }
    node, path = 0, []
    for k in accepted:
        found = child_of.get((node, kept.token_ids[k]))
        if found is None:
            return None  # not a pruning of this proposal
        node = found
        path.append(node)
    children = tuple(i for i in range(1, proposed.num_nodes) if proposed.parents[i] == node)
    if not children:
        return None
    following = emitted[len(accepted)]
    hits = [i for i in children if proposed.token_ids[i] == following][:1]
    return VerifiedTree(verified.request_id, proposed, (*path, *hits), tested=children)
