"""Lossless sampling, measured: speculative outputs follow the target distribution exactly.

A toy "target model" and "draft model" over a vocabulary of V = 5: fixed random distributions
per context (the tokens generated so far, up to 3), the target's rows produced by the real
``processed_probs`` (temperature 0.8, top-k 4: every row has a zero-probability token, so
residuals must keep truncated tokens out). Each trial runs speculative steps until two tokens
exist and records them; the empirical joint distribution of (token 1, token 2), and the marginal
of token 1, must match the exact target within total variation 0.03. The second token is often
produced by a second step, so the joint also checks that the steps compose.

Every drafting scheme is checked with its matching rule, and the mismatched pairings with the
biased direction must exceed the same bound (the test has teeth). Sampled children verified
with the deterministic rule are lossless (that rule is exact for any children chosen
independently of the verifier's randomness) but accept fewer drafts: asserted as such.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.model.sampler import processed_probs
from server.spec_decode.tree import TokenTree
from server.spec_decode.verify import VerifyResult, verify_chain_sampled, verify_tree_sampled

V = 5
MAX_CONTEXT = 3
TRIALS = 8000
# The biased pairings miss by TV > 0.15: fewer trials show it.
BIASED_TRIALS = 2000
BOUND = 0.03

# ---------------------------------------------------------------------------------------------
# The toy models: one row per context of length 0..3
# ---------------------------------------------------------------------------------------------

_CONTEXTS = [c for n in range(MAX_CONTEXT + 1) for c in itertools.product(range(V), repeat=n)]
_INDEX = {c: i for i, c in enumerate(_CONTEXTS)}


_TARGET_LOGITS = 1.5 * torch.randn(len(_CONTEXTS), V, generator=torch.Generator().manual_seed(11))


def _target_table() -> torch.Tensor:
    request = Request(
        request_id="toy",
        prompt_token_ids=[0],
        sampling_params=SamplingParams(temperature=0.8, top_k=4),
        eos_token_ids=frozenset(),
        max_total_tokens=100,
    )
    return processed_probs(_TARGET_LOGITS, [request] * len(_CONTEXTS))  # [C, V]


def _draft_table(seed: int) -> torch.Tensor:
    """A draft that roughly agrees with the target (as a small model does), full support."""
    noise = torch.randn(len(_CONTEXTS), V, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(_TARGET_LOGITS + 1.5 * noise, dim=1)  # [C, V]


P = _target_table()
Q = _draft_table(12)
Q_OTHER = _draft_table(13)
_Q_CUM = np.cumsum(Q.double().numpy(), axis=1)
_Q_TOP = Q.argsort(dim=1, descending=True).tolist()


def exact_joint() -> torch.Tensor:
    """P(token 1 = a, token 2 = b) = p(a | ()) p(b | (a,)): [V, V] float64."""
    first = P[_INDEX[()]].double()
    second = torch.stack([P[_INDEX[(a,)]].double() for a in range(V)])
    return first[:, None] * second


# ---------------------------------------------------------------------------------------------
# Drafting schemes: context -> (token tree, node contexts)
# ---------------------------------------------------------------------------------------------

Drafting = Callable[[tuple[int, ...], np.random.Generator], TokenTree]


def _sample_q(ctx: tuple[int, ...], rng: np.random.Generator) -> int:
    return min(int(np.searchsorted(_Q_CUM[_INDEX[ctx]], rng.random(), side="right")), V - 1)


def _build(root: int, spec: list[tuple[int, int]]) -> TokenTree:
    return TokenTree((root, *(t for _, t in spec)), (-1, *(p for p, _ in spec)))


def chain_sampled(ctx: tuple[int, ...], rng: np.random.Generator) -> TokenTree:
    x1 = _sample_q(ctx, rng)
    x2 = _sample_q((*ctx, x1), rng)
    return TokenTree.chain(0, [x1, x2])


def chain_top1(ctx: tuple[int, ...], rng: np.random.Generator) -> TokenTree:
    x1 = _Q_TOP[_INDEX[ctx]][0]
    return TokenTree.chain(0, [x1, _Q_TOP[_INDEX[(*ctx, x1)]][0]])


def tree_sampled(ctx: tuple[int, ...], rng: np.random.Generator) -> TokenTree:
    """3 children i.i.d. from q (duplicates kept), each with 2 i.i.d. children: 9 drafts."""
    spec = [(0, _sample_q(ctx, rng)) for _ in range(3)]
    for child in (1, 2, 3):
        sub = (*ctx, spec[child - 1][1])
        spec += [(child, _sample_q(sub, rng)) for _ in range(2)]
    return _build(0, spec)


def tree_topk(ctx: tuple[int, ...], rng: np.random.Generator) -> TokenTree:
    """Top-3 of q at the root, top-2 under each: 9 deterministic drafts."""
    spec = [(0, t) for t in _Q_TOP[_INDEX[ctx]][:3]]
    for child in (1, 2, 3):
        sub = (*ctx, spec[child - 1][1])
        spec += [(child, t) for t in _Q_TOP[_INDEX[sub]][:2]]
    return _build(0, spec)


# ---------------------------------------------------------------------------------------------
# Verification rules under test: (tree, target rows, draft rows, generator) -> result
# ---------------------------------------------------------------------------------------------

Rule = Callable[[TokenTree, torch.Tensor, torch.Tensor, torch.Generator], VerifyResult]


def chain_with_q(
    t: TokenTree, p: torch.Tensor, q: torch.Tensor, g: torch.Generator
) -> VerifyResult:
    return verify_chain_sampled(t, p, q, g)


def chain_point_mass(
    t: TokenTree, p: torch.Tensor, q: torch.Tensor, g: torch.Generator
) -> VerifyResult:
    return verify_chain_sampled(t, p, None, g)


def tree_multistep(
    t: TokenTree, p: torch.Tensor, q: torch.Tensor, g: torch.Generator
) -> VerifyResult:
    return verify_tree_sampled(t, p, q, g, "sampled")


def tree_deterministic(
    t: TokenTree, p: torch.Tensor, q: torch.Tensor, g: torch.Generator
) -> VerifyResult:
    return verify_tree_sampled(t, p, None, g, "deterministic")


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    joint: torch.Tensor  # [V, V] empirical frequencies of (token 1, token 2)
    mean_first_step_tokens: float

    @property
    def tv_joint(self) -> float:
        return 0.5 * float((self.joint - exact_joint()).abs().sum())

    @property
    def tv_first(self) -> float:
        return 0.5 * float((self.joint.sum(1) - exact_joint().sum(1)).abs().sum())


@functools.cache
def run(
    drafting: Drafting,
    rule: Rule,
    draft_table_name: str = "Q",
    seed: int = 0,
    trials: int = TRIALS,
) -> Outcome:
    """``trials`` speculative generations of two tokens; cached (tests share runs)."""
    draft_table = {"Q": Q, "Q_OTHER": Q_OTHER}[draft_table_name]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, dtype=torch.float64)
    first_step_tokens = 0
    for _ in range(trials):
        ctx: tuple[int, ...] = ()
        step = 0
        while len(ctx) < 2:
            tree = drafting(ctx, rng)
            # Context of node i = ctx + the draft tokens on its path (parents come first).
            node_ctx = [ctx]
            for i in range(1, tree.num_nodes):
                node_ctx.append((*node_ctx[tree.parents[i]], tree.token_ids[i]))
            rows = [_INDEX[c] for c in node_ctx]
            result = rule(tree, P[rows], draft_table[rows], gen)
            ctx = (*ctx, *result.tokens)
            if step == 0:
                first_step_tokens += len(result.tokens)
            step += 1
        counts[ctx[0], ctx[1]] += 1
    return Outcome(counts / trials, first_step_tokens / trials)


LOSSLESS = {
    "chain sampled drafts, rejection sampling": (chain_sampled, chain_with_q),
    "chain top-1 drafts, point-mass rule": (chain_top1, chain_point_mass),
    "tree i.i.d. children, SpecInfer multi-step": (tree_sampled, tree_multistep),
    "tree top-k children, deterministic rule": (tree_topk, tree_deterministic),
}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_matching_rule_is_lossless(name: str) -> None:
    drafting, rule = LOSSLESS[name]
    out = run(drafting, rule)
    assert out.tv_first < BOUND, (name, out.tv_first)
    assert out.tv_joint < BOUND, (name, out.tv_joint)
    assert out.mean_first_step_tokens > 1.2, out.mean_first_step_tokens  # drafts do get accepted


BIASED = {
    # Deterministic children verified as if drawn from q: over-accepts them.
    "tree top-k children, SpecInfer rule": (tree_topk, tree_multistep, "Q"),
    "chain top-1 drafts, rejection sampling with q": (chain_top1, chain_with_q, "Q"),
    # Sampled children verified against a q they were not drawn from.
    "chain sampled from q, verified with another q": (chain_sampled, chain_with_q, "Q_OTHER"),
}


@pytest.mark.parametrize("name", list(BIASED))
def test_mismatched_rule_is_caught(name: str) -> None:
    drafting, rule, table = BIASED[name]
    out = run(drafting, rule, table, trials=BIASED_TRIALS)
    assert out.tv_joint > BOUND, (name, out.tv_joint)


def test_deterministic_rule_on_sampled_children_is_lossless_but_wasteful() -> None:
    matched = run(tree_sampled, tree_multistep)
    cautious = run(tree_sampled, tree_deterministic)
    assert cautious.tv_first < BOUND and cautious.tv_joint < BOUND
    assert cautious.mean_first_step_tokens < matched.mean_first_step_tokens - 0.05


def test_merging_duplicate_sampled_siblings_is_biased() -> None:
    """Two children i.i.d. from q at the root: kept as drafted the SpecInfer rule is exact;
    merged into one node when they coincide (as ``from_paths`` would), it is not: rejecting the
    duplicate again would have moved the residual from norm(max(p - q, 0)) one step further.
    The pair (p, q) below maximises the effect (exact TV about 0.14)."""
    p = torch.tensor([0.45, 0.55, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.33, 0.67], dtype=torch.float64)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    trials = 3000
    kept = torch.zeros(3, dtype=torch.float64)
    merged = torch.zeros(3, dtype=torch.float64)
    for _ in range(trials):
        a, b = (int(t) for t in rng.choice(3, size=2, p=q.numpy()))
        for children, counts in (([a, b], kept), ([a] if a == b else [a, b], merged)):
            tree = TokenTree((0, *children), (-1, *([0] * len(children))))
            rows = tree.num_nodes
            res = verify_tree_sampled(tree, p.expand(rows, 3), q.expand(rows, 3), gen, "sampled")
            counts[res.tokens[0]] += 1
    assert 0.5 * float((kept / trials - p).abs().sum()) < BOUND
    assert 0.5 * float((merged / trials - p).abs().sum()) > 0.08
