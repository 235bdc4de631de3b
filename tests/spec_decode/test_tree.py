"""TokenTree structure: constructors, derived index maps and attention masks."""

from __future__ import annotations

import pytest
import torch

from server.spec_decode.tree import TokenTree


def brute_ancestor_mask(tree: TokenTree) -> torch.Tensor:
    n1 = tree.num_nodes
    mask = torch.zeros((n1, n1), dtype=torch.bool)
    for i in range(n1):
        for j in tree.path_to(i):
            mask[i, j] = True
    return mask


def decode_words(words: torch.Tensor, n1: int) -> torch.Tensor:
    """int32 bit words [n1, W] -> bool [n1, n1], reading bit j % 32 of word j // 32."""
    out = torch.zeros((n1, n1), dtype=torch.bool)
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(n1):
        for j in range(n1):
            out[i, j] = bool((int(as_unsigned[i, j // 32]) >> (j % 32)) & 1)
    return out


def test_root_only_is_plain_decode() -> None:
    t = TokenTree.root_only(7)
    assert t.num_drafts == 0 and t.num_nodes == 1
    assert t.is_chain and t.depths == (0,) and t.children == ((),)
    assert t.draft_token_ids == []
    assert t.mask_words().tolist() == [[1]]
    assert t.mask_words().dtype == torch.int32


def test_chain() -> None:
    t = TokenTree.chain(9, [4, 5, 6])
    assert t.token_ids == (9, 4, 5, 6)
    assert t.parents == (-1, 0, 1, 2)
    assert t.is_chain and t.num_drafts == 3
    assert t.depths == t.position_offsets == (0, 1, 2, 3)
    assert t.path_to(3) == [0, 1, 2, 3]
    assert torch.equal(t.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert t.mask_words().tolist() == [[1], [3], [7], [15]]


def test_from_paths_shares_prefixes_in_priority_order() -> None:
    t = TokenTree.from_paths(0, [[1, 2, 3], [1, 4], [5], [1, 2, 3]], max_nodes=10)
    # 1 -> 2 -> 3 first, then 4 under the shared 1, then 5 under the root; the repeat adds none.
    assert t.token_ids == (0, 1, 2, 3, 4, 5)
    assert t.parents == (-1, 0, 1, 2, 1, 0)
    assert t.children == ((1, 5), (2, 4), (3,), (), (), ())
    assert t.depths == (0, 1, 2, 3, 2, 1)
    assert not t.is_chain
    assert t.path_to(4) == [0, 1, 4]
    assert torch.equal(t.ancestor_mask(), brute_ancestor_mask(t))


def test_from_paths_budget_keeps_earlier_paths() -> None:
    paths = [[1, 2, 3], [1, 4, 6], [5]]
    assert TokenTree.from_paths(0, paths, max_nodes=0) == TokenTree.root_only(0)
    t = TokenTree.from_paths(0, paths, max_nodes=4)
    # The first path takes 3 nodes, the second adds 4 (its 1 is shared) and stops there.
    assert t.token_ids == (0, 1, 2, 3, 4)
    assert t.parents == (-1, 0, 1, 2, 1)
    assert TokenTree.from_paths(0, paths, max_nodes=2).token_ids == (0, 1, 2)
    # An empty path list or empty paths give the root alone.
    assert TokenTree.from_paths(3, [[], []], max_nodes=5) == TokenTree.root_only(3)


def test_mask_words_span_two_words_and_set_bit_31() -> None:
    # A 40-draft chain with a side branch: rows past node 31 need a second word, and node 31's
    # bit is the int32 sign bit.
    chain = list(range(100, 140))
    t = TokenTree.from_paths(1, [chain, [*chain[:35], 7]], max_nodes=64)
    n1 = t.num_nodes
    assert n1 == 42
    words = t.mask_words()
    assert words.shape == (42, 2) and words.dtype == torch.int32
    assert torch.equal(decode_words(words, n1), brute_ancestor_mask(t))
    assert torch.equal(t.ancestor_mask(), brute_ancestor_mask(t))
    # Row 31 (the 32nd node) sets bits 0..31 of word 0: all ones = -1 in two's complement.
    assert words[31, 0].item() == -1 and words[31, 1].item() == 0
    assert words[40, 1].item() == (1 << 9) - 1  # nodes 32..40 on its path
    side = 41  # the branch node: ancestors 0..35, itself bit 41
    assert t.parents[side] == 35 and t.depths[side] == 36
    assert words[side, 1].item() == 0b1111 | (1 << 9)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="at least the root"):
        TokenTree((), ())
    with pytest.raises(ValueError, match="same length"):
        TokenTree((1, 2), (-1,))
    with pytest.raises(ValueError, match="parents\\[0\\] must be -1"):
        TokenTree((1, 2), (0, 0))
    with pytest.raises(ValueError, match="topological"):
        TokenTree((1, 2, 3), (-1, 2, 0))
    with pytest.raises(ValueError, match=">= 0"):
        TokenTree((1, -2), (-1, 0))
    with pytest.raises(ValueError, match="max_nodes"):
        TokenTree.from_paths(0, [[1]], max_nodes=-1)
    with pytest.raises(ValueError, match="not in a tree"):
        TokenTree.chain(0, [1]).path_to(2)


def test_lists_are_coerced_and_trees_hashable() -> None:
    t = TokenTree([1, 2], [-1, 0])  # type: ignore[arg-type]
    assert t == TokenTree.chain(1, [2])
    assert hash(t) == hash(TokenTree.chain(1, [2]))
