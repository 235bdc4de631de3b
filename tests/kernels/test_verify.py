"""verify_greedy against its node-by-node reference and against hand-checked trees."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import chain_parents, mask_words_of, random_parents, star_parents

from kernels.verify import verify_greedy, verify_greedy_ref


def _batch(trees: list[list[int]], words: int) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(trees) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([len(p) for p in trees]).cumsum(0)
    return cu, torch.cat([mask_words_of(p, words) for p in trees])


def _agreeing(trees: list[list[int]], vocab: int, gen: torch.Generator) -> tuple:
    """Random drafts over a tiny vocab (so many nodes match), target argmax random too."""
    t = sum(len(p) for p in trees)
    draft = torch.randint(0, vocab, (t,), generator=gen)
    argmax = torch.randint(0, vocab, (t,), generator=gen)
    return draft, argmax


def _same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.cpu(), y.cpu()), (a, b)


def test_hand_checked_tree(device: str) -> None:
    # 0 -> 1 (tok 5), 0 -> 2 (tok 7), 1 -> 3 (tok 9), 2 -> 4 (tok 1); target after 0 says 7,
    # after 2 says 1, after 4 says 3: path 0, 2, 4 and bonus 3.
    parents = [-1, 0, 0, 1, 2]
    cu, mask = _batch([parents], 1)
    draft = torch.tensor([0, 5, 7, 9, 1])
    argmax = torch.tensor([7, 2, 1, 4, 3])
    n, path, bonus = verify_greedy(
        cu.to(device), draft.to(device), argmax.to(device), mask.to(device)
    )
    assert n.tolist() == [3] and path.tolist() == [[0, 2, 4, -1, -1]] and bonus.tolist() == [3]
    _same((n, path, bonus), verify_greedy_ref(cu, draft, argmax, mask))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_trees_match_reference(seed: int, device: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    trees = [
        random_parents(40, gen),
        [-1],
        chain_parents(6),
        star_parents(5),
        random_parents(17, gen),
    ]
    cu, mask = _batch(trees, 2)  # 40 nodes: two mask words
    draft, argmax = _agreeing(trees, 2, gen)
    got = verify_greedy(cu.to(device), draft.to(device), argmax.to(device), mask.to(device))
    _same(got, verify_greedy_ref(cu, draft, argmax, mask))


def test_chain_without_mask_equals_chain_mask(device: str) -> None:
    gen = torch.Generator().manual_seed(5)
    trees = [chain_parents(7), chain_parents(3)]
    cu, mask = _batch(trees, 1)
    draft, argmax = _agreeing(trees, 2, gen)
    a = verify_greedy(cu.to(device), draft.to(device), argmax.to(device))
    b = verify_greedy(cu.to(device), draft.to(device), argmax.to(device), mask.to(device))
    _same(a, b)
    _same(a, verify_greedy_ref(cu, draft, argmax))
