"""Token Recycling ("Turning Trash into Treasure", Luo et al. 2024): the target's own top-k,
recycled as drafts.

Every verified row's logits hold the target's top-k guesses for the next token, and plain
decoding throws all but one away. This drafter keeps them in an adjacency table, token -> its
top-k successor candidates with their probabilities, overwritten with the newest top-k each
time the token is computed. A draft tree then grows from the request's last token by walking
the table, best-first by path probability (server/spec_decode/tree_builder.py), and after
verification every computed row refreshes its token's candidates.

Beyond the paper, the table is also kept per (previous token, token) pair, and a node's
children come from its pair's row and its token's row together (the pair's first, when both
list a token): "the" after "of" and after "in" are followed by different words, and the pair
row remembers which. A node's score tells the policy which row it came from, so their
acceptance is calibrated apart.

Three scopes (``scope``):

- ``"request"``: small tables per request (~0.2 MB), gone when it finishes. Nothing leaks
  between requests; measured better than shared in 5 of 6 bench_spec cells
  (loadtest/results/spec/2026-12-03-drafters.md): a shared table mixes unrelated contexts.
  But a request's own tables know only the tokens it has computed, so most steps of a fresh
  free-form answer (a token it has not met yet) have nothing to draft.
- ``"shared"``: one table for every request, of fixed size (2^17 tokens and 2^18 pairs, ~28
  MB at k = 8; the oldest-written rows make room). What one request taught the table drafts
  the next one: the paper's "hot start".
- ``"layered"``: both. A node's children come from the request's own rows first; the shared
  table fills in the tokens the request has not met (and candidates its rows do not list),
  scored apart (+2) so the policy calibrates the shared rows' acceptance separately. On
  free-form chat a request then has drafts at ~60% of its steps instead of ~40% (fixed k = 3,
  batch 1: 1.27x plain decoding against 1.17x per request); on repetitive prompts its own
  rows are the better guide and the shared ones dilute them (1.47x against 1.62x), and under
  the goodput policy per-request tables do as well or better everywhere
  (loadtest/results/spec/2026-12-05-drafters.md), so they stay the default.

Both are seeded from the prompt: a token (or pair) with no row yet gets the token that
followed it in the prompt, at a low prior probability, so a request's first steps have a
draft before the target has ever been asked about that token.

The runner hands the top-k over once per step for all rows together (``TopTokens``): one
``topk`` over the step's logits and one device-to-host copy, not a sync per request.
Children are a function of the context and the tables ("deterministic" kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import get_args

import numpy as np

from server.config import RecycleScope
from server.engine.request import Request
from server.spec_decode.drafter import TopTokens
from server.spec_decode.history import HistoryDrafter, TokenHistory
from server.spec_decode.tree import TokenTree
from server.spec_decode.tree_builder import Child, grow_tree

RECYCLE_SCOPES: tuple[RecycleScope, ...] = get_args(RecycleScope)
# P(accepted) given to a prompt bigram before the target has spoken about its first token.
_SEED_PROB = 0.05
# Rows kept per table: shared tables hold a vocabulary's worth of single tokens and many more
# (previous token, token) pairs; a request's own tables only what one request meets.
_SHARED_CAPACITY = {1: 1 << 17, 2: 1 << 18}
_REQUEST_CAPACITY = {1: 1 << 10, 2: 1 << 11}
# Estimated bytes of one dict slot (key int + slot int + hash entry), for state_bytes.
_DICT_BYTES_PER_KEY = 100
_TOKEN_BITS = 32
# Bucket edges of the recorded probabilities; a (previous token, token) row's score is its
# probability + 1, so the policy calibrates the two orders apart, and a row of the shared
# table behind a request's own ("layered") scores 2 more again.
_PROB_EDGES = (0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
_PAIR_OFFSET = 1.0
_SHARED_OFFSET = 2.0
# Score offset per kind of row: a request's own single-token and pair rows, the shared
# table's behind them.
_ROW_OFFSETS = (0.0, _PAIR_OFFSET, _SHARED_OFFSET, _SHARED_OFFSET + _PAIR_OFFSET)


class TopKTable:
    """key -> (candidate ids, their probabilities) [k], best first, for at most ``capacity``
    keys: when full, the oldest-written key gives its row to the new one (a ring), so memory
    is fixed however long the server runs."""

    def __init__(self, capacity: int, top_k: int) -> None:
        self.capacity = capacity
        self.top_k = top_k
        self._slots: dict[int, int] = {}
        self._keys = np.full(capacity, -1, dtype=np.int64)
        self.ids = np.full((capacity, top_k), -1, dtype=np.int32)
        self.probs = np.zeros((capacity, top_k), dtype=np.float32)
        self._next = 0

    def _slot_for(self, key: int) -> int:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._next
            self._next = (self._next + 1) % self.capacity
            old = int(self._keys[slot])
            if old >= 0:
                del self._slots[old]
            self._keys[slot] = key
            self._slots[key] = slot
        return slot

    def put(self, keys: list[int], ids: np.ndarray, probs: np.ndarray) -> None:
        """Rows ``keys`` take the newest top-k ``ids`` / ``probs`` [N, >= k] (a key repeated
        in ``keys``: the later row wins, as the more recent context)."""
        slots = [self._slot_for(key) for key in keys]
        self.ids[slots] = ids[:, : self.top_k]
        self.probs[slots] = probs[:, : self.top_k]

    def seed(self, key: int, token: int) -> None:
        """``token`` becomes ``key``'s only candidate, at a low prior, if ``key`` has no row."""
        if key in self._slots:
            return
        slot = self._slot_for(key)
        self.ids[slot] = -1
        self.probs[slot] = 0.0
        self.ids[slot, 0] = token
        self.probs[slot, 0] = _SEED_PROB

    def get(self, key: int) -> int | None:
        """The key's row index into ``ids`` / ``probs``, or None."""
        return self._slots.get(key)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return (
            self._keys.nbytes
            + self.ids.nbytes
            + self.probs.nbytes
            + _DICT_BYTES_PER_KEY * len(self._slots)
        )


def pair_key(prev: int, token: int) -> int:
    return (prev << _TOKEN_BITS) | token


class SuccessorTables:
    """The drafter's memory for one scope: single tokens and (previous token, token) pairs."""

    def __init__(self, capacity: dict[int, int], top_k: int) -> None:
        self.single = TopKTable(capacity[1], top_k)
        self.pair = TopKTable(capacity[2], top_k)

    def update(
        self, prev: np.ndarray, tokens: np.ndarray, ids: np.ndarray, probs: np.ndarray
    ) -> None:
        token_list = tokens.tolist()
        self.single.put(token_list, ids, probs)
        prev_list = prev.tolist()
        if min(prev_list) >= 0:  # the usual case: no masked copies
            keys = [pair_key(p, t) for p, t in zip(prev_list, token_list, strict=True)]
            self.pair.put(keys, ids, probs)
            return
        has_prev = prev >= 0
        if has_prev.any():
            keys = [pair_key(p, t) for p, t in zip(prev_list, token_list, strict=True) if p >= 0]
            self.pair.put(keys, ids[has_prev], probs[has_prev])

    def seed(self, tokens: np.ndarray) -> None:
        """The prompt's n-grams: each token's follower becomes its candidate where it has none."""
        values = tokens.tolist()
        for i in range(1, len(values)):
            self.single.seed(values[i - 1], values[i])
            if i >= 2:
                self.pair.seed(pair_key(values[i - 2], values[i - 1]), values[i])

    def candidates(
        self, prev: int, token: int, offset: float = 0.0
    ) -> list[tuple[int, float, float]]:
        """(candidate, probability, score offset): the pair's row first (offset + 1), then
        the single token's (``offset``); a candidate in both keeps its pair entry."""
        out: list[tuple[int, float, float]] = []
        rows = [(self.pair, pair_key(prev, token), offset + _PAIR_OFFSET)] if prev >= 0 else []
        for table, key, row_offset in (*rows, (self.single, token, offset)):
            slot = table.get(key)
            if slot is not None:
                ids, probs = table.ids[slot].tolist(), table.probs[slot].tolist()
                out += [(t, p, row_offset) for t, p in zip(ids, probs, strict=True) if t >= 0]
        return out

    @property
    def nbytes(self) -> int:
        return self.single.nbytes + self.pair.nbytes


class RecycleDrafter(HistoryDrafter):
    name = "recycle"
    # Node score = the target's probability of the candidate when it was recorded, + 1 when
    # it was recorded after the same two tokens (a pair row) rather than the same one, + 2
    # when it came from the shared table behind a request's own ("layered").
    row_kinds = len(_ROW_OFFSETS)
    score_edges = tuple(
        edge
        for offset in _ROW_OFFSETS
        for edge in ((offset,) if offset else ()) + tuple(offset + e for e in _PROB_EDGES)
    )

    def __init__(
        self,
        vocab_size: int,
        top_k: int = 8,
        max_width: int = 4,
        scope: RecycleScope = "request",
        history: TokenHistory | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"recycle top_k must be >= 1, got {top_k}")
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {max_width}")
        if scope not in RECYCLE_SCOPES:
            raise ValueError(f"recycle scope must be one of {RECYCLE_SCOPES}, got {scope!r}")
        super().__init__(history)
        self.vocab_size = vocab_size
        self.feedback_top_k = top_k
        self.max_width = max_width
        self.scope = scope
        self._shared = SuccessorTables(_SHARED_CAPACITY, top_k) if scope != "request" else None
        self._per_request: dict[str, SuccessorTables] = {}
        self._seeded: set[str] = set()

    def tables(self, request_id: str) -> SuccessorTables:
        """The tables a request's own rows go to (and are drafted from first)."""
        if self.scope == "shared":
            assert self._shared is not None
            return self._shared
        tables = self._per_request.get(request_id)
        if tables is None:
            tables = SuccessorTables(_REQUEST_CAPACITY, self.feedback_top_k)
            self._per_request[request_id] = tables
        return tables

    def _propose_one(self, request: Request, budget: int) -> TokenTree:
        ids = request.all_token_ids
        root = ids[-1]
        if budget <= 0:
            return TokenTree.root_only(root)
        tables = self.tables(request.request_id)
        if request.request_id not in self._seeded:
            self._seeded.add(request.request_id)
            tables.seed(self._history.tokens(request))
        prev = ids[-2] if len(ids) > 1 else -1
        return grow_tree(root, (prev, root), self.expander(tables), budget, self.max_width)

    def expander(
        self, tables: SuccessorTables
    ) -> Callable[[tuple[int, int]], list[Child[tuple[int, int]]]]:
        """``expand`` for grow_tree: a node (previous token, token) has the recorded top-k of
        its pair and of its token alone as children, then ("layered") the shared table's
        (grow_tree keeps the first of a token listed twice, and orders by probability)."""
        behind = self._shared if self.scope == "layered" else None
        vocab_size, width = self.vocab_size, self.max_width

        def expand(state: tuple[int, int]) -> list[Child[tuple[int, int]]]:
            prev, token = state
            found = tables.candidates(prev, token)
            if behind is not None:
                found += behind.candidates(prev, token, _SHARED_OFFSET)
            # Only the first max_width distinct candidates (grow_tree's rule), so no Child is
            # built for the rest of the rows (up to 2-3 x top_k candidates a node).
            children: list[Child[tuple[int, int]]] = []
            seen: set[int] = set()
            for t, p, offset in found:
                if t < vocab_size and p > 0.0 and t not in seen:
                    seen.add(t)
                    children.append(Child(t, p, p + offset, (token, t)))
                    if len(children) == width:
                        break
            return children

        return expand

    def observe_top_tokens(self, top: TopTokens) -> None:
        """Every row computed this step refreshes its token's (and pair's) candidates."""
        if self._shared is not None:
            self._shared.update(top.prev_tokens, top.tokens, top.ids, top.probs)
        if self.scope == "shared":
            return
        for rid, rows in top.request_runs():
            self.tables(rid).update(
                top.prev_tokens[rows], top.tokens[rows], top.ids[rows], top.probs[rows]
            )

    def release(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        super().release(ids)
        for rid in ids:
            self._per_request.pop(rid, None)
            self._seeded.discard(rid)

    @property
    def state_bytes(self) -> int:
        shared = self._shared.nbytes if self._shared is not None else 0
        if self.scope == "shared":
            return shared
        return shared + sum(t.nbytes for t in self._per_request.values())

    def memory(self) -> dict[str, tuple[int, int]]:
        # Shared tables are allocated whole at start; per-request ones grow with the batch.
        return {"recycle_tables": (self.state_bytes, self.state_bytes)}
