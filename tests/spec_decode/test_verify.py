"""Verification on hand-made cases: greedy walks, argument checks, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from server.spec_decode.tree import TokenTree
from server.spec_decode.verify import (
    VerifyResult,
    verify,
    verify_chain_sampled,
    verify_greedy,
    verify_tree_sampled,
)

# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


def test_greedy_full_accept_gives_bonus() -> None:
    tree = TokenTree.chain(9, [4, 5, 6])
    res = verify_greedy(tree, [4, 5, 6, 7])
    assert res.accepted_nodes == [1, 2, 3]
    assert res.tokens == [4, 5, 6, 7]
    assert res.num_accepted == 3 and res.last_node == 3
    assert res.source_rows == [0, 1, 2, 3]


def test_greedy_partial_and_none() -> None:
    tree = TokenTree.chain(9, [4, 5, 6])
    assert verify_greedy(tree, [4, 8, 6, 7]) == VerifyResult([1], [4, 8])
    assert verify_greedy(tree, torch.tensor([3, 5, 6, 7])) == VerifyResult([], [3])
    assert verify_greedy(TokenTree.root_only(9), [2]) == VerifyResult([], [2])


def test_greedy_tree_follows_the_matching_branch() -> None:
    # root -> {1 -> {2, 3}, 4 -> {5}}: the target says 4 then 5 then 8.
    tree = TokenTree.from_paths(0, [[1, 2], [1, 3], [4, 5]], max_nodes=8)
    assert tree.token_ids == (0, 1, 2, 3, 4, 5)
    argmax = [4, 3, 0, 0, 5, 8]
    res = verify_greedy(tree, argmax)
    assert res.accepted_nodes == [4, 5]
    assert res.tokens == [4, 5, 8]
    # The second sibling at depth 2: 1 then 3, bonus from node 3's row.
    res = verify_greedy(tree, [1, 3, 0, 6, 0, 0])
    assert res.accepted_nodes == [1, 3] and res.tokens == [1, 3, 6]


def test_greedy_equals_plain_greedy_decoding_on_a_toy_model() -> None:
    """Speculative greedy decoding reproduces plain greedy decoding token for token."""
    vocab = 7
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, vocab, generator=gen)  # logits after (prev2, prev1)

    def next_token(context: list[int]) -> int:
        return int(table[context[-2], context[-1]].argmax())

    prompt = [1, 2]
    plain = list(prompt)
    while len(plain) < 40:
        plain.append(next_token(plain))

    spec = list(prompt)
    draft_gen = torch.Generator().manual_seed(1)
    while len(spec) < 40:
        # Random trees of mixed quality: sometimes the true next tokens, sometimes noise.
        paths = []
        for _ in range(3):
            path, ctx = [], list(spec)
            for _ in range(3):
                tok = int(torch.randint(vocab, (1,), generator=draft_gen))
                if torch.rand(1, generator=draft_gen) < 0.6:
                    tok = next_token(ctx)
                path.append(tok)
                ctx.append(tok)
            paths.append(path)
        tree = TokenTree.from_paths(spec[-1], paths, max_nodes=6)
        argmax = []
        for node in range(tree.num_nodes):
            ctx = spec + [tree.token_ids[j] for j in tree.path_to(node)[1:]]
            argmax.append(next_token(ctx))
        spec.extend(verify_greedy(tree, argmax).tokens)
    assert spec[:40] == plain


# ---------------------------------------------------------------------------------------------
# Sampled: mechanics and reproducibility
# ---------------------------------------------------------------------------------------------


def _random_probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(rows, vocab, generator=gen), dim=1)


def test_chain_and_tree_rules_agree_on_chains() -> None:
    tree = TokenTree.chain(0, [1, 2, 3])
    for seed in range(200):
        p = _random_probs(4, 5, seed)
        q = _random_probs(4, 5, seed + 1000)
        for draft, mode in ((q, "sampled"), (None, "deterministic")):
            a = verify_chain_sampled(tree, p, draft, torch.Generator().manual_seed(seed))
            b = verify_tree_sampled(tree, p, draft, torch.Generator().manual_seed(seed), mode)
            assert a == b, (seed, mode)


def test_seeded_verification_is_reproducible() -> None:
    tree = TokenTree.from_paths(0, [[1, 2], [3, 4], [5]], max_nodes=5)
    p = _random_probs(tree.num_nodes, 6, 0)
    q = _random_probs(tree.num_nodes, 6, 1)
    for mode, draft in (("sampled", q), ("deterministic", None)):
        runs = [
            verify_tree_sampled(tree, p, draft, torch.Generator().manual_seed(7), mode)
            for _ in range(3)
        ]
        assert runs[0] == runs[1] == runs[2]
        outcomes = {
            tuple(
                verify_tree_sampled(tree, p, draft, torch.Generator().manual_seed(s), mode).tokens
            )
            for s in range(50)
        }
        assert len(outcomes) > 3  # the seed matters


def test_point_mass_target_accepts_exactly_the_greedy_path() -> None:
    # One-hot target rows (a greedy request through processed_probs): deterministic verification
    # never deviates from verify_greedy whatever the random numbers.
    tree = TokenTree.from_paths(0, [[1, 2], [3, 4]], max_nodes=4)
    argmax = [3, 2, 1, 4, 0]
    p = torch.nn.functional.one_hot(torch.tensor(argmax), 5).float()
    want = verify_greedy(tree, argmax)
    for seed in range(20):
        got = verify_tree_sampled(
            tree, p, None, torch.Generator().manual_seed(seed), "deterministic"
        )
        assert got == want
        assert verify(tree, p, None, None, greedy=True, kind="deterministic") == want


def test_accepted_tokens_match_nodes() -> None:
    tree = TokenTree.from_paths(0, [[1, 2, 3], [4, 5]], max_nodes=5)
    p = _random_probs(tree.num_nodes, 6, 3)
    for seed in range(100):
        res = verify_tree_sampled(
            tree, p, None, torch.Generator().manual_seed(seed), "deterministic"
        )
        assert res.tokens[:-1] == [tree.token_ids[i] for i in res.accepted_nodes]
        assert res.accepted_nodes == tree.path_to(res.last_node)[1:]
        assert 0 <= res.tokens[-1] < 6


def test_zero_probability_tokens_are_never_emitted() -> None:
    # Truncated target rows (top-k / top-p zeros) must stay zero in every residual.
    tree = TokenTree.from_paths(0, [[1], [2], [3]], max_nodes=3)
    p = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]] + [[1 / 6] * 6] * 3)
    q = torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0, 0.0]] + [[1 / 6] * 6] * 3)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        assert verify_tree_sampled(tree, p, q, g, "sampled").tokens[0] in (2, 4)
        g = torch.Generator().manual_seed(seed)
        assert verify_tree_sampled(tree, p, None, g, "deterministic").tokens[0] in (2, 4)


def test_argument_errors() -> None:
    chain = TokenTree.chain(0, [1])
    tree = TokenTree.from_paths(0, [[1], [2]], max_nodes=2)
    p = _random_probs(3, 4, 0)
    with pytest.raises(ValueError, match="needs a chain"):
        verify_chain_sampled(tree, p, None, None)
    with pytest.raises(ValueError, match="target_probs must be"):
        verify_chain_sampled(chain, p, None, None)
    with pytest.raises(ValueError, match="draft_probs must match"):
        verify_tree_sampled(tree, p, p[:2], None, "sampled")
    with pytest.raises(ValueError, match="needs draft_probs"):
        verify_tree_sampled(tree, p, None, None, "sampled")
    with pytest.raises(ValueError, match="draft_probs=None"):
        verify_tree_sampled(tree, p, p, None, "deterministic")
    with pytest.raises(ValueError, match="mode must be"):
        verify_tree_sampled(tree, p, None, None, "topk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per node"):
        verify_greedy(tree, [1, 2])
    with pytest.raises(ValueError, match="need draft_probs"):
        verify(tree, p, None, None, greedy=False, kind="sampled")
