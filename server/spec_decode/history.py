"""Per-request token histories as numpy arrays, grown incrementally, and suffix matching on them.

``Request.all_token_ids`` only ever grows by appending (preemption recomputes K/V but keeps the
tokens), so a drafter converts each token to numpy once instead of the whole list every step:
converting a 4k-token list costs ~100 us, appending the step's 1-9 new tokens ~2 us.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from server.engine.request import Request
from server.spec_decode.drafter import DraftKind, DraftWork, check_budgets
from server.spec_decode.tree import TokenTree


class TokenHistory:
    """request_id -> int64 array of ``all_token_ids``; call ``release`` for finished requests."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}
        # Per request, its last suffix matching: (context length, max_match, ends, lengths).
        self._matches: dict[str, tuple[int, int, np.ndarray, np.ndarray]] = {}

    def tokens(self, request: Request) -> np.ndarray:
        """A read-only view [L] int64 of ``request.all_token_ids`` (valid until the next call)."""
        ids = request.all_token_ids
        rid = request.request_id
        buf = self._buffers.get(rid)
        length = self._lengths.get(rid, 0)
        # Sanity check of the append-only assumption: same last cached token, no shrinking.
        if buf is None or length > len(ids) or (length and buf[length - 1] != ids[length - 1]):
            buf = np.empty(max(2 * len(ids), 64), dtype=np.int64)
            length = 0
            self._matches.pop(rid, None)  # another context: its last matching says nothing
        if len(ids) > len(buf):
            grown = np.empty(2 * len(ids), dtype=np.int64)
            grown[:length] = buf[:length]
            buf = grown
        if len(ids) > length:
            buf[length : len(ids)] = ids[length:]
            length = len(ids)
        self._buffers[rid] = buf
        self._lengths[rid] = length
        view = buf[:length]
        view.flags.writeable = False
        return view

    def matches(
        self, request: Request, max_match: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, ends, lengths)``: the request's tokens (as ``tokens``) and their
        ``suffix_matches``, computed once per context length: the drafters that share a
        history (``auto``'s n-gram and suffix sources) match the same context, at up to 4 and
        8 tokens. A matching at a larger ``max_match`` answers a smaller one (its lengths
        capped)."""
        tokens = self.tokens(request)
        rid = request.request_id
        memo = self._matches.get(rid)
        if memo is not None and memo[0] == len(tokens) and memo[1] >= max_match:
            _, most, ends, lengths = memo
            capped = lengths if most == max_match else np.minimum(lengths, max_match)
            return tokens, ends, capped
        ends, lengths = suffix_matches(tokens, max_match)
        self._matches[rid] = (len(tokens), max_match, ends, lengths)
        return tokens, ends, lengths

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._buffers.pop(rid, None)
            self._lengths.pop(rid, None)
            self._matches.pop(rid, None)

    def __len__(self) -> int:
        return len(self._buffers)


def suffix_matches(tokens: np.ndarray, max_match: int) -> tuple[np.ndarray, np.ndarray]:
    """Earlier occurrences of the context's suffix, with how long a suffix each one matches.

    tokens: [L] int64. Returns ``(ends, lengths)``, both [M] int64, ascending in ``ends``: every
    position ``e < L - 1`` with ``tokens[e] == tokens[L - 1]``, and ``lengths[m]`` = the number
    of trailing tokens that match, i.e. the largest ``k <= max_match`` with
    ``tokens[e - k + 1 : e + 1] == tokens[L - k : L]``. The token after ``ends[m]`` is what
    followed that occurrence. Cost O(L + M * max_match), all in numpy.
    """
    length = len(tokens)
    if length < 2 or max_match < 1:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
    lengths = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for k in range(1, max_match):
        # Compare the k-th token before each occurrence with the k-th before the end.
        if k >= length:
            break
        ok = alive & (ends >= k)
        idx = np.where(ok, ends - k, 0)
        ok &= tokens[idx] == tokens[length - 1 - k]
        lengths += ok
        alive = ok
        if not alive.any():
            break
    return ends, lengths


def continuation(tokens: np.ndarray, end: int, count: int) -> list[int]:
    """The ``count`` tokens predicted to follow the context if it repeats what followed ``end``.

    The tokens after ``end`` run out at the end of the context after ``L - 1 - end`` of them;
    past that the prediction repeats itself with period ``L - 1 - end`` (the matched suffix is
    predicted to recur), which is what prompt lookup would propose step after step anyway.
    """
    period = len(tokens) - 1 - end
    assert period >= 1, (end, len(tokens))
    base = tokens[end + 1 : end + 1 + min(count, period)].tolist()
    return [base[i % period] for i in range(count)] if count > period else base


def ordered_candidates(ends: np.ndarray, lengths: np.ndarray, min_match: int) -> Sequence[int]:
    """Indices into ``ends`` with ``lengths >= min_match``: longest match first, then latest."""
    keep = np.flatnonzero(lengths >= min_match)
    # lexsort sorts by the last key first; negate for descending.
    order = np.lexsort((-ends[keep], -lengths[keep]))
    return keep[order].tolist()


class HistoryDrafter:
    """What the model-free drafters share: a token history per request, deterministic drafts,
    one tree per request from ``_propose_one`` (subclasses implement it)."""

    kind: DraftKind = "deterministic"
    # Proposing costs microseconds of numpy: propose up to the cap, let the policy prune.
    free_proposals = True
    score_edges: tuple[float, ...] | None = None
    last_work = DraftWork()

    def __init__(self, history: TokenHistory | None = None) -> None:
        """``history``: shared with other drafters of the same requests (``auto``'s sources),
        so each context is converted and matched once a step."""
        self._history = history if history is not None else TokenHistory()

    def propose(self, requests: list[Request], budgets: list[int]) -> list[TokenTree]:
        check_budgets(requests, budgets)
        return [self._propose_one(r, b) for r, b in zip(requests, budgets, strict=True)]

    def _propose_one(self, request: Request, budget: int) -> TokenTree:
        raise NotImplementedError

    def release(self, request_ids: Iterable[str]) -> None:
        self._history.release(request_ids)

    def reset(self, request_ids: Iterable[str]) -> None:
        pass  # token histories survive preemption (the tokens do)

    def draft_probs(self, request_id: str) -> None:
        return None  # deterministic drafts
