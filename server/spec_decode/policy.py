"""Speculation policies: how many draft tokens each decoding request verifies this step.

A policy is a plain object, unit-tested without a model. Per step the engine calls:

- ``allocate(base, requests, caps) -> budgets``: before drafting, for every decoding request
  that may speculate and its cap (the config's maximum, the request's own
  ``speculation.max_tokens``, the room left before max_tokens, and the token budget and KV
  slots the scheduler could reserve). ``0 <= budget <= cap``; 0 = plain decode. Model
  drafters draft exactly this; model-free drafters (``free_proposals``) are given it as
  their proposal size;
- ``select(base, requests, trees) -> trees``: model-free drafters only, after proposing:
  which nodes of each proposal to verify (a pruned tree must stay a tree);
- ``reservation(cap, last_budget)``: at scheduling, before new prompts are admitted: how
  many of a decoding request's cap draft slots to hold for it (``last_budget``: the drafts it
  verified in the last step it could speculate, None before any); the rest of the cap is
  given only from what admission leaves;
- ``observe(observation)``: after the step, with its shape, its measured time, and which
  nodes each verified tree had accepted.

``base`` is the step without drafts (its shape for the cost model, and the tokens it emits
anyway). ``none`` and ``fixed`` are the baselines; ``smartspec_uniform`` (SmartSpec's one k
for the batch) and ``goodput`` (ours: per-request budgets by marginal value) live in their own
modules; ``server.spec_decode.policies`` picks one by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.request import Request
from server.spec_decode.allocator import StepBase
from server.spec_decode.cost_model import CostModel, StepShape
from server.spec_decode.drafter import VerifiedTree
from server.spec_decode.tree import TokenTree


@dataclass
class StepObservation:
    """One engine step as the policy sees it."""

    # What the step computed, drafts included (after drafting and pruning).
    shape: StepShape
    # Wall seconds of the whole step: schedule, draft, forward, verify, update.
    seconds: float
    verified: list[VerifiedTree] = field(default_factory=list)
    # First drafts proposed for requests that decoded plainly this step, scored against the
    # token plain decoding emitted: what verifying them would have accepted (see
    # Speculator.fill). Without them a policy that stops verifying stops learning.
    shadowed: list[VerifiedTree] = field(default_factory=list)
    # Draft tokens verified this step (all trees).
    num_draft_tokens: int = 0
    # Requests that finished or were aborted since the last step (drop their estimates).
    finished_request_ids: frozenset[str] = frozenset()


@dataclass
class PolicyStats:
    """The policy's view for /metrics and logs (sent with every batch of outputs)."""

    name: str
    # Steps the cost model predicted before they ran, and those predictions' totals.
    num_predicted_steps: int = 0
    predicted_seconds_total: float = 0.0
    measured_seconds_total: float = 0.0
    # Expected emitted tokens per second of the last allocation (0: none made yet).
    estimated_goodput: float = 0.0
    # Median relative error of recent held-out predictions (NaN before any).
    cost_model_relative_error: float = math.nan
    cost_model_coefficients: dict[str, float] = field(default_factory=dict)
    # Global conditional acceptance by draft depth 1..k (the prior of new requests).
    acceptance_by_depth: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy is built with (PolicyFactory's one argument)."""

    # num_speculative_tokens: the most draft tokens one request may verify.
    max_spec_tokens: int
    # The drafter proposes for free (model-free) and the policy prunes after proposing.
    free_proposals: bool = True
    # Bucket edges of the drafter's node scores (None: no scores).
    score_edges: tuple[float, ...] | None = None
    # The step-time model (fitted online, seeded by the start-up profile). Policies that
    # weigh cost against acceptance need it; the baselines ignore it.
    cost_model: CostModel | None = None


class SpecPolicy(Protocol):
    name: str
    # True: the policy learns acceptance, so the speculator shadows the requests it gives no
    # budget (StepObservation.shadowed).
    learns_acceptance: bool
    # True while this step's budgets were set without valuing its drafts (goodput's quiet
    # steps): nothing reads the estimates until the next valued step, so the speculator
    # shadows fewer requests meanwhile.
    quiet: bool

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]: ...

    def reservation(self, cap: int, last_budget: int | None) -> int: ...

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]: ...

    def observe(self, observation: StepObservation) -> None: ...

    def stats(self) -> PolicyStats: ...


class NoSpeculation:
    """Every request decodes one token per step."""

    name = "none"
    learns_acceptance = False
    quiet = False

    def __init__(self, context: PolicyContext | None = None) -> None:
        pass

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        return [0] * len(requests)

    def reservation(self, cap: int, last_budget: int | None) -> int:
        return 0

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]:
        return [TokenTree.root_only(t.root_token) for t in trees]

    def observe(self, observation: StepObservation) -> None:
        pass

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name)


class FixedBudget:
    """Every decoding request gets its whole cap every step: vLLM's behaviour."""

    name = "fixed"
    learns_acceptance = False
    quiet = False

    def __init__(self, context: PolicyContext | None = None) -> None:
        pass

    def allocate(self, base: StepBase, requests: list[Request], caps: list[int]) -> list[int]:
        return list(caps)

    def reservation(self, cap: int, last_budget: int | None) -> int:
        return cap

    def select(
        self, base: StepBase, requests: list[Request], trees: list[TokenTree]
    ) -> list[TokenTree]:
        return trees

    def observe(self, observation: StepObservation) -> None:
        pass

    def stats(self) -> PolicyStats:
        return PolicyStats(self.name)


def growing_reservation(cap: int, last_budget: int | None) -> int:
    """Room for a request's budget to double (plus one) from last step's: budgets that move
    from step to step (hysteresis holds them steady) reach any cap within a few steps, while
    a request the policy keeps at 0 holds one slot instead of its whole cap."""
    return min(cap, 2 * (last_budget or 0) + 1)
