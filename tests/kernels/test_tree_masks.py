"""Mask-word helpers (kernels/tree_masks.py) against the tests' own bit packing."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import chain_parents, mask_words_of, random_parents, star_parents

from kernels.tree_masks import (
    ancestor_words,
    batch_mask_words,
    causal_mask_words,
    pack_mask_words,
    tree_mask_dense,
)


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 70])
def test_words_round_trip(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for parents in (random_parents(n, gen), chain_parents(n), star_parents(n)):
        words = ancestor_words(parents)
        assert words.shape == (n, (n + 31) // 32) and words.dtype == torch.int32
        assert torch.equal(words, mask_words_of(parents, words.shape[1]))
        assert torch.equal(pack_mask_words(tree_mask_dense(words, n)), words)
    assert torch.equal(causal_mask_words(n, 3), mask_words_of(chain_parents(n), 3))


def test_batch_rows_are_causal_except_trees() -> None:
    gen = torch.Generator().manual_seed(0)
    tree = random_parents(40, gen)
    query_lens = [3, 40, 1, 7]
    masks = [None, tree_mask_dense(ancestor_words(tree), 40), None, None]
    got = batch_mask_words(query_lens, masks)
    want = torch.cat(
        [
            mask_words_of(chain_parents(3), 2),
            mask_words_of(tree, 2),
            mask_words_of(chain_parents(1), 2),
            mask_words_of(chain_parents(7), 2),
        ]
    )
    assert torch.equal(got, want)


def test_rejects_non_topological_parents() -> None:
    with pytest.raises(ValueError, match="topological"):
        ancestor_words([-1, 2, 0])
