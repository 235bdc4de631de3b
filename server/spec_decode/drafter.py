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

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
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


@dataclass(frozen=True)
class TopTokens:
    """The target's top-k next-token guesses at every row a step computed logits for (plain
    decode rows and every node of every draft tree), handed over once per step.

    request_ids: per row, its request; tokens: [N] the token the row computed (its input);
    prev_tokens: [N] the token before it on the row's path (-1 at the start of a sequence);
    ids / probs: [N, k] the target's k likeliest next tokens after that row and their
    probabilities (softmax of the raw logits), best first.
    """

    request_ids: tuple[str, ...]
    tokens: np.ndarray
    prev_tokens: np.ndarray
    ids: np.ndarray
    probs: np.ndarray

    def request_runs(self) -> list[tuple[str, slice]]:
        """(request, rows) for each run of consecutive rows of one request: slices, so a
        drafter takes each request's rows as views (a step's rows come request by request)."""
        runs: list[tuple[str, slice]] = []
        ids = self.request_ids
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                runs.append((ids[start], slice(start, i)))
                start = i
        return runs


@dataclass(frozen=True)
class VerifiedTree:
    """One request's verified draft: the tree as verified (after the policy pruned it) and
    its accepted nodes (in path order, root excluded). ``tested``, when given, names the only
    nodes this outcome tests (the path above them is accepted and was counted already):
    children the policy pruned, scored for free (engine/speculation.py)."""

    request_id: str
    tree: TokenTree
    accepted_nodes: tuple[int, ...]
    tested: tuple[int, ...] | None = None


@runtime_checkable
class VerifiedTreeConsumer(Protocol):
    """A drafter that learns from verification outcomes (the composite calibrates its
    sources): the engine hands it each step's verified trees."""

    def observe_verified(self, verified: Iterable[VerifiedTree]) -> None: ...


@runtime_checkable
class FinishedRequestConsumer(Protocol):
    """A drafter that learns from whole finished requests (the cross-request suffix cache):
    the engine hands it the requests that finished this step, with all their tokens."""

    def observe_finished(self, requests: Iterable[Request]) -> None: ...


@runtime_checkable
class StatefulDrafter(Protocol):
    """A drafter whose learned state takes memory worth watching (suffix cache, recycle
    tables): per part, (bytes held, bytes allowed), for /metrics."""

    def memory(self) -> dict[str, tuple[int, int]]: ...


@runtime_checkable
class TopTokenConsumer(Protocol):
    """A drafter that learns from the target's top-k (Token Recycling): the runner computes
    ``feedback_top_k`` guesses per row and the engine passes them on after each step."""

    feedback_top_k: int

    def observe_top_tokens(self, top: TopTokens) -> None: ...


@functools.cache
def implements(cls: type, protocol: type) -> bool:
    """``issubclass`` against a method-only runtime-checkable protocol, remembered per class:
    typing's check walks the protocol's members (~30 us a call), and the engine asks every
    step."""
    return issubclass(cls, protocol)


def check_budgets(requests: list[Request], budgets: list[int]) -> None:
    if len(requests) != len(budgets):
        raise ValueError(
            f"one budget per request: {len(requests)} requests, {len(budgets)} budgets"
        )
    if any(b < 0 for b in budgets):
        raise ValueError(f"budgets must be >= 0, got {budgets}")
    if any(not r.all_token_ids for r in requests):
        raise ValueError("a request with no tokens has no root token to draft from")
