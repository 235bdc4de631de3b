"""A model-free tree drafter: several continuations of suffix matches, merged into one tree.

Every earlier occurrence of the context's suffix (prompt + output) votes for what followed it:
the continuations form a trie whose node weights sum the votes passing through them, longer
suffix matches voting more (a 4-token match predicts better than a 1-token one). The tree keeps
the ``budget`` trie nodes with the highest estimated path probability (product of conditional
vote shares along the path, times a per-depth decay), at most ``max_width`` children per node,
chosen best-first so a parent always precedes its children. On repetitive text with variations
("A B C ... A B X ... A B") this proposes both "C" and "X" after "A B" instead of betting on one.

Children are a deterministic function of the context ("deterministic" kind, like top-k).
"""

from __future__ import annotations

from server.engine.request import Request
from server.spec_decode.history import (
    HistoryDrafter,
    TokenHistory,
    continuation,
    ordered_candidates,
)
from server.spec_decode.tree import TokenTree
from server.spec_decode.tree_builder import Child, grow_tree

# Occurrences considered per request (longest match first, then latest): bounds the Python
# work to _MAX_CANDIDATES * budget trie insertions however common the last token is.
_MAX_CANDIDATES = 32
# Vote of an occurrence matching k tokens, relative to the longest match length m: 2^(k - m).
_LENGTH_BASE = 2.0
# Estimated acceptance decays with depth even along a unanimous continuation, so a deep node of
# a unanimous chain does not always beat a shallow alternative.
_DEPTH_DECAY = 0.8


class SuffixTreeDrafter(HistoryDrafter):
    name = "tree"
    # Node score = its share of its parent's votes; buckets by quarter, and >= 0.95.
    score_edges = (0.25, 0.5, 0.75, 0.95)

    def __init__(
        self,
        max_width: int = 4,
        min_match: int = 1,
        max_match: int = 8,
        history: TokenHistory | None = None,
    ) -> None:
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {max_width}")
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        self.max_width = max_width
        self.min_match = min_match
        self.max_match = max_match
        super().__init__(history)

    def _propose_one(self, request: Request, budget: int) -> TokenTree:
        root = request.all_token_ids[-1]
        if budget <= 0:
            return TokenTree.root_only(root)
        candidates = self.candidates(request, budget)
        if not candidates:
            return TokenTree.root_only(root)
        best = max(length for _, length in candidates)
        trie = _Trie()
        for path, length in candidates:
            trie.add(path, _LENGTH_BASE ** (length - best))
        return trie.best_first_tree(root, budget, self.max_width)

    def candidates(self, request: Request, budget: int) -> list[tuple[list[int], int]]:
        """(continuation of up to ``budget`` tokens, suffix match length behind it) for the
        request's own earlier occurrences of its suffix, longest match first, then latest."""
        tokens, ends, lengths = self._history.matches(request, self.max_match)
        picked = ordered_candidates(ends, lengths, self.min_match)[:_MAX_CANDIDATES]
        return [(continuation(tokens, int(ends[m]), budget), int(lengths[m])) for m in picked]


class _Trie:
    """Continuation trie: node 0 = the root; per node its children by token and summed votes."""

    def __init__(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.tokens: list[int] = [-1]
        self.weights: list[float] = [0.0]

    def add(self, path: list[int], vote: float) -> None:
        node = 0
        self.weights[0] += vote
        for token in path:
            nxt = self.children[node].get(token)
            if nxt is None:
                nxt = len(self.tokens)
                self.children[node][token] = nxt
                self.children.append({})
                self.tokens.append(token)
                self.weights.append(0.0)
            self.weights[nxt] += vote
            node = nxt

    def best_first_tree(self, root_token: int, budget: int, max_width: int) -> TokenTree:
        """The ``budget`` trie nodes with the highest path probability as a TokenTree.

        A child's conditional estimate is its share of its parent's votes times a per-depth
        decay; its score (what the policy calibrates) is the share alone. Ties go to the
        earlier-inserted node (the longer / more recent match).
        """

        def expand(trie_node: int) -> list[Child[int]]:
            total = self.weights[trie_node]
            ranked = sorted(self.children[trie_node].values(), key=lambda k: -self.weights[k])
            return [
                Child(self.tokens[k], _DEPTH_DECAY * share, share, k)
                for k in ranked
                for share in (self.weights[k] / total,)
            ]

        return grow_tree(root_token, 0, expand, budget, max_width)
