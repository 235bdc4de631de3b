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

import heapq

from server.engine.request import Request
from server.spec_decode.history import (
    HistoryDrafter,
    continuation,
    ordered_candidates,
    suffix_matches,
)
from server.spec_decode.tree import TokenTree

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

    def __init__(self, max_width: int = 4, min_match: int = 1, max_match: int = 8) -> None:
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {max_width}")
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        self.max_width = max_width
        self.min_match = min_match
        self.max_match = max_match
        super().__init__()

    def _propose_one(self, request: Request, budget: int) -> TokenTree:
        root = request.all_token_ids[-1]
        if budget <= 0:
            return TokenTree.root_only(root)
        tokens = self._history.tokens(request)
        ends, lengths = suffix_matches(tokens, self.max_match)
        picked = ordered_candidates(ends, lengths, self.min_match)[:_MAX_CANDIDATES]
        if not picked:
            return TokenTree.root_only(root)
        best = int(lengths[picked[0]])
        trie = _Trie()
        for m in picked:
            vote = _LENGTH_BASE ** (int(lengths[m]) - best)
            trie.add(continuation(tokens, int(ends[m]), budget), vote)
        return trie.best_first_tree(root, budget, self.max_width)


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
        """The ``budget`` highest-scoring trie nodes as a TokenTree (topological by design).

        A child's score is at most its parent's (shares <= 1, decay < 1), and children enter
        the heap only once their parent is taken, so output order is topological. Ties go to
        the earlier-inserted node (the longer / more recent match).
        """
        tokens = [root_token]
        parents = [-1]
        # Per node its vote share under its parent: the score the policy calibrates.
        shares = [0.0]
        # (-score, insertion order, trie node, tree index of its parent, vote share)
        heap: list[tuple[float, int, int, int, float]] = []
        order = 0

        def push_children(trie_node: int, score: float, tree_index: int) -> None:
            nonlocal order
            kids = self.children[trie_node]
            total = self.weights[trie_node]
            ranked = sorted(kids.values(), key=lambda k: -self.weights[k])[:max_width]
            for kid in ranked:
                share = self.weights[kid] / total
                child_score = score * _DEPTH_DECAY * share
                heapq.heappush(heap, (-child_score, order, kid, tree_index, share))
                order += 1

        push_children(0, 1.0, 0)
        while heap and len(tokens) - 1 < budget:
            neg_score, _, trie_node, parent_index, share = heapq.heappop(heap)
            tokens.append(self.tokens[trie_node])
            parents.append(parent_index)
            shares.append(share)
            push_children(trie_node, -neg_score, len(tokens) - 1)
        return TokenTree(tuple(tokens), tuple(parents), tuple(shares))
