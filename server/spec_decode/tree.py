"""Token trees: the draft a request verifies in one target forward.

Node 0 is the ROOT: the request's last verified token (``all_token_ids[-1]``), the known token
whose K/V this step computes. Nodes 1..n are draft tokens in topological order
(``parents[i] < i``). Plain decoding is the tree with no drafts; a chain is the tree whose every
node has the previous one as parent.

Index maps (prefix_len = tokens whose K/V is already cached, i.e. ``num_computed_tokens``):

- node i is stored at cache slot position ``prefix_len + i`` (so the batch stays contiguous),
- node i is rotated (RoPE) at position ``prefix_len + depths[i]`` (its position in the text),
- node i attends to the whole prefix plus the nodes j with ``ancestor_mask()[i, j]``.

After verification the accepted path's K/V is compacted to consecutive positions
(``prefix_len + depth``); since ``depth <= index`` along a topologically ordered path, an in-order
copy never overwrites a source it still needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

_WORD_BITS = 32


@dataclass(frozen=True)
class TokenTree:
    """An immutable draft tree. Sequences passed in are stored as tuples.

    token_ids: len n + 1; ``token_ids[0]`` is the root (last verified) token.
    parents: len n + 1; ``parents[0] == -1`` and ``0 <= parents[i] < i`` for i >= 1.
    Siblings may repeat a token (i.i.d.-sampled children can); the constructors never make them.
    scores: None, or len n + 1: the drafter's confidence in each node given its parent (n-gram
    match length, suffix vote share; the root's is unused). The goodput policy calibrates
    scores into acceptance probabilities online (server/spec_decode/acceptance.py).
    """

    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    # Not part of the tree's identity: two trees with the same nodes are the same tree.
    scores: tuple[float, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Frozen: coerce through object.__setattr__ so callers may pass lists.
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))
            if len(self.scores) != len(self.token_ids):
                raise ValueError(
                    f"scores must have one entry per node ({len(self.token_ids)}), "
                    f"got {len(self.scores)}"
                )
        tokens, parents = self.token_ids, self.parents
        if not tokens:
            raise ValueError("a TokenTree needs at least the root token (token_ids is empty)")
        if len(parents) != len(tokens):
            raise ValueError(
                f"token_ids and parents must have the same length (got {len(tokens)} and "
                f"{len(parents)}): one parent per node, -1 for the root"
            )
        if parents[0] != -1:
            raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {parents[0]}")
        for i in range(1, len(parents)):
            if not 0 <= parents[i] < i:
                raise ValueError(
                    f"parents[{i}] = {parents[i]} is not a node before {i}: nodes must be in "
                    "topological order (0 <= parents[i] < i)"
                )
        bad = [t for t in tokens if t < 0]
        if bad:
            raise ValueError(f"token ids must be >= 0, got {bad[:5]}")

    # -----------------------------------------------------------------------------------------
    # Constructors
    # -----------------------------------------------------------------------------------------

    @classmethod
    def root_only(cls, root_token: int) -> TokenTree:
        """Plain decoding: the root alone, no drafts."""
        return cls((root_token,), (-1,))

    @classmethod
    def chain(
        cls, root_token: int, drafts: Sequence[int], scores: Sequence[float] | None = None
    ) -> TokenTree:
        """root -> drafts[0] -> drafts[1] -> ... (node i + 1 = drafts[i]); ``scores[i]`` is
        draft i's score (the root's is set to 0)."""
        node_scores = None if scores is None else (0.0, *scores)
        return cls((root_token, *drafts), tuple(range(-1, len(drafts))), node_scores)

    @classmethod
    def from_paths(
        cls, root_token: int, paths: Sequence[Sequence[int]], max_nodes: int
    ) -> TokenTree:
        """Merge several continuations of the root into a trie of at most ``max_nodes`` drafts.

        Shared prefixes are shared (a token already under the same parent reuses that node).
        Earlier paths have priority: paths are inserted in order and insertion stops for good
        at the first new node that would exceed ``max_nodes``, so a later path never takes
        budget from an earlier one. Children keep insertion order (earlier path first).
        """
        if max_nodes < 0:
            raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
        tokens = [root_token]
        parents = [-1]
        child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for path in paths:
            node = 0
            for token in path:
                found = child_of.get((node, token))
                if found is None:
                    if len(tokens) - 1 >= max_nodes:
                        return cls(tuple(tokens), tuple(parents))
                    found = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    child_of[(node, token)] = found
                node = found
        return cls(tuple(tokens), tuple(parents))

    def subtree(self, keep: Sequence[int]) -> TokenTree:
        """The tree of the nodes in ``keep`` (the root is always kept), renumbered in their
        original order. Every kept node's parent must be kept: a pruned tree stays a tree."""
        kept = sorted({0, *keep})
        new_index = {old: new for new, old in enumerate(kept)}
        parents = [-1]
        for old in kept[1:]:
            parent = self.parents[old]
            if parent not in new_index:
                raise ValueError(f"node {old} is kept without its parent {parent}")
            parents.append(new_index[parent])
        scores = None if self.scores is None else tuple(self.scores[i] for i in kept)
        return TokenTree(tuple(self.token_ids[i] for i in kept), tuple(parents), scores)

    # -----------------------------------------------------------------------------------------
    # Structure
    # -----------------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """n + 1: the root plus the drafts (= query rows this request adds to the forward)."""
        return len(self.token_ids)

    @property
    def num_drafts(self) -> int:
        return len(self.token_ids) - 1

    @property
    def draft_token_ids(self) -> list[int]:
        """Nodes 1..n's tokens in node order (what goes into ``Request.spec_token_ids``)."""
        return list(self.token_ids[1:])

    @property
    def root_token(self) -> int:
        return self.token_ids[0]

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth per node, root 0."""
        depths = [0] * len(self.parents)
        for i in range(1, len(self.parents)):
            depths[i] = depths[self.parents[i]] + 1
        return tuple(depths)

    @property
    def position_offsets(self) -> tuple[int, ...]:
        """RoPE offset per node: node i is rotated at position ``prefix_len + depths[i]``."""
        return self.depths

    @cached_property
    def max_depth(self) -> int:
        return max(self.depths)

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children per node, in node order (the order verification tries them)."""
        kids: list[list[int]] = [[] for _ in self.parents]
        for i in range(1, len(self.parents)):
            kids[self.parents[i]].append(i)
        return tuple(tuple(k) for k in kids)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node``, both included: ``[0, ..., node]``."""
        if not 0 <= node < len(self.parents):
            raise ValueError(f"node {node} is not in a tree of {len(self.parents)} nodes")
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    # -----------------------------------------------------------------------------------------
    # Attention masks
    # -----------------------------------------------------------------------------------------

    @cached_property
    def ancestor_bits(self) -> tuple[int, ...]:
        """Per node, a Python int whose bit j is set when node j is an ancestor-or-self."""
        bits = [1]
        for i in range(1, len(self.parents)):
            bits.append(bits[self.parents[i]] | (1 << i))
        return tuple(bits)

    def ancestor_mask(self) -> torch.Tensor:
        """[n + 1, n + 1] bool on CPU: ``mask[i, j]`` = node j is an ancestor-or-self of node i."""
        n1 = len(self.parents)
        mask = torch.zeros((n1, n1), dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]  # parents[i] < i: its row is complete
            mask[i, i] = True
        return mask

    def mask_words(self) -> torch.Tensor:
        """[n + 1, ceil((n + 1) / 32)] int32 on CPU: ancestor bit words per query row.

        Bit ``j % 32`` of word ``j // 32`` of row i is set when node j is an ancestor-or-self
        of node i. Words are stored as int32 two's complement (bit 31 set -> negative value),
        the layout the tree-attention kernel reads.
        """
        n1 = len(self.parents)
        num_words = (n1 + _WORD_BITS - 1) // _WORD_BITS
        rows = []
        for bits in self.ancestor_bits:
            row = []
            for w in range(num_words):
                word = (bits >> (_WORD_BITS * w)) & 0xFFFFFFFF
                row.append(word - (1 << 32) if word >= 1 << 31 else word)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int32)
