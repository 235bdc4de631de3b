"""The drafter interface (``server.spec_decode.drafters`` picks one by name from config).

A drafter turns each request's context (``Request.all_token_ids``) into a ``TokenTree`` whose
root is ``all_token_ids[-1]`` and whose drafts continue after it, using at most ``budgets[i]``
draft nodes for ``requests[i]`` (0 = plain decode, the root alone). The speculation policy picks
the budgets; the drafter never exceeds them.

``kind`` tells verification how children were drafted, because lossless sampled verification
depends on it (see server/spec_decode/verify.py): "deterministic" = children are a function of the
context (n-gram lookup, top-k), "sampled" = children drawn i.i.d. from the drafter's
distribution q, which the drafter must then also return for verification.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

from server.engine.request import Request
from server.spec_decode.tree import TokenTree

DraftKind = Literal["deterministic", "sampled"]


@dataclass(frozen=True)
class DraftWork:
    """What the last ``propose`` cost a model drafter: forward passes (sequential, one per
    chain position) and rows computed (catch-up + drafts). Zero for model-free drafters."""

    forwards: int = 0
    rows: int = 0


@runtime_checkable
class Drafter(Protocol):
    name: str
    kind: DraftKind
    # True: proposing is nearly free (model-free drafters), so the engine proposes up to each
    # request's cap and the policy then prunes the trees; False: the policy's budgets are set
    # before drafting (draft models pay per token).
    free_proposals: bool
    # Bucket edges of the scores the drafter attaches to nodes (TokenTree.scores), or None.
    score_edges: tuple[float, ...] | None
    # The cost of the last proposal, for the policy's cost model.
    last_work: DraftWork

    def propose(self, requests: list[Request], budgets: list[int]) -> list[TokenTree]:
        """One tree per request, ``trees[i].num_drafts <= budgets[i]``."""
        ...

    def draft_probs(self, request_id: str) -> Tensor | None:
        """Kind "sampled": the [n + 1, V] draft distributions of the request's last proposal
        (row i = the q node i's children were drawn from); None for deterministic drafters
        and for requests verified greedily."""
        ...

    def reset(self, request_ids: Iterable[str]) -> None:
        """The requests were preempted: their K/V is gone (state tied to the cache must go;
        token histories and random generators stay)."""
        ...

    def release(self, request_ids: Iterable[str]) -> None:
        """Drop per-request state of finished requests (a no-op for stateless drafters)."""
        ...


def check_budgets(requests: list[Request], budgets: list[int]) -> None:
    if len(requests) != len(budgets):
        raise ValueError(
            f"one budget per request: {len(requests)} requests, {len(budgets)} budgets"
        )
    if any(b < 0 for b in budgets):
        raise ValueError(f"budgets must be >= 0, got {budgets}")
    if any(not r.all_token_ids for r in requests):
        raise ValueError("a request with no tokens has no root token to draft from")
