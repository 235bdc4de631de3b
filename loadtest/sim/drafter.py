"""The simulated drafter: chains of exactly the budgeted length, made of a dummy token.

Whether a draft is right is decided by the simulated runner (per-request alpha), so the
drafter only has to be shaped like the real ones: kind "deterministic", no node scores, and

- mode "free" (n-gram-like, ``free_proposals``): the engine asks for the whole cap and the
  policy prunes; proposing does no model work;
- mode "model" (a draft model): budgets come before drafting and ``last_work`` counts what a
  draft model with its own cache would compute, as ``DraftModelDrafter`` does: one forward per
  chain position, and rows = catch-up (the tokens its cache lacks up to the root, all of the
  context on first sight or after a preemption) + one per later draft.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.engine.request import Request
from server.spec_decode.drafter import DraftKind, DraftWork, check_budgets
from server.spec_decode.tree import TokenTree

# Every draft token; the runner emits it for an accepted draft and BONUS_TOKEN otherwise, so a
# draft cache's tokens match the request's exactly where drafts were accepted.
DRAFT_TOKEN = 1


class SimDrafter:
    kind: DraftKind = "deterministic"
    score_edges: tuple[float, ...] | None = None

    def __init__(self, mode: str) -> None:
        if mode not in ("free", "model"):
            raise ValueError(f"drafter mode must be free or model, got {mode!r}")
        self.name = f"sim-{mode}"
        self.free_proposals = mode == "free"
        self.last_work = DraftWork()
        # Requests proposed for since begin_step (the true cost charges a model-free proposal).
        self.proposed = 0
        # Model mode: request_id -> (root position of the last proposal, drafts fed back).
        self._cache: dict[str, tuple[int, int]] = {}

    def begin_step(self) -> None:
        """Called before each step: ``last_work`` and ``proposed`` then describe that step."""
        self.last_work = DraftWork()
        self.proposed = 0

    def propose(self, requests: list[Request], budgets: list[int]) -> list[TokenTree]:
        check_budgets(requests, budgets)
        trees = []
        forwards = rows = 0
        for r, b in zip(requests, budgets, strict=True):
            root = r.num_computed_tokens
            trees.append(TokenTree.chain(r.all_token_ids[root], [DRAFT_TOKEN] * b))
            if b > 0:
                self.proposed += 1
                if not self.free_proposals:
                    rows += self._catch_up_rows(r) + b - 1
                    forwards = max(forwards, b)
                    self._cache[r.request_id] = (root, b - 1)
        if not self.free_proposals:
            self.last_work = DraftWork(forwards, rows)
        return trees

    def _catch_up_rows(self, r: Request) -> int:
        """Tokens up to and including the root that the draft cache lacks (>= 1)."""
        root = r.num_computed_tokens
        cached = self._cache.get(r.request_id)
        if cached is None:
            return root + 1
        prev_root, fed = cached
        # The cache holds tokens 0..prev_root, then `fed` draft tokens: valid while they match.
        valid = prev_root + 1
        for token in r.all_token_ids[prev_root + 1 : prev_root + 1 + fed]:
            if token != DRAFT_TOKEN:
                break
            valid += 1
        return root + 1 - min(valid, root)

    def draft_probs(self, request_id: str) -> None:
        return None

    def reset(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:  # preempted: the draft's K/V went with the blocks
            self._cache.pop(rid, None)

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._cache.pop(rid, None)
