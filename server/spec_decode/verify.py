"""Lossless verification of a draft tree against the target model's distributions.

Row conventions (n = tree.num_drafts, V = vocab):

- ``target_probs[i]`` [n + 1, V]: the processed target distribution of the token *after* node i
  (``server.model.sampler.processed_probs`` of node i's logits row: temperature, top-k, top-p,
  min-p; one-hot for greedy requests).
- ``draft_probs[i]`` [n + 1, V]: the draft distribution q that node i's *children* were drawn
  from (rows of leaves are unused). None = deterministic drafts (q is a point mass).

Every function returns the accepted draft path plus one bonus/correction token, distributed
exactly as plain decoding with the target would produce them. All randomness (the uniforms and
the final draw, via the exponential trick of ``server.model.sampler.draw``) comes from the
given generator, so a seeded request is reproducible. A generator must live on
``target_probs``' device. Uniforms are drawn up front, one per draft node (node j uses
``u[j - 1]`` when it is tested), so the random stream consumed per step does not depend on the
outcome.

Which tree rule (see ``verify_tree_sampled``):

- "sampled" (SpecInfer multi-step speculative sampling) is exact only when each child is an
  independent draw from ``draft_probs[parent]``: accepting x with min(1, p(x)/q(x)) and falling
  back to norm(max(p - q, 0)) reproduces p *because* P(child = x) = q(x). Applied to children
  picked deterministically (n-gram, top-k) it over-accepts them: a top-1 chain child x is output
  with probability p(x)/q(x) > p(x) whenever p(x) < q(x). Biased.
- "deterministic" treats each child as fixed: accept x with the current p(x), else zero it,
  renormalise and try the next. It is exact for *any* set of children chosen independently of
  the verification's random numbers, so it is also exact for sampled children, but it then
  accepts with p(x) instead of min(1, p(x)/q(x)) and wastes drafts. Wrong in the sense of
  needlessly slow, not biased (tests/spec_decode/test_verify_statistics.py measures both).

Sampled children must be i.i.d. *with replacement* and kept as drafted: merging duplicate
siblings (as ``TokenTree.from_paths`` does) or pruning children by their values changes the
residual sequence and biases the "sampled" rule. Keep duplicates as separate nodes.

The per-node loops here sync with the host a few times per request; they are the reference a
batched device implementation must match, given the same uniforms and noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from server.model.sampler import draw
from server.spec_decode.tree import TokenTree

TreeMode = Literal["sampled", "deterministic"]


@dataclass
class VerifyResult:
    """The outcome for one request.

    accepted_nodes: draft node indices along the accepted path, root excluded, in order.
    tokens: the accepted draft tokens + the bonus/correction token (len = accepted + 1).
    """

    accepted_nodes: list[int]
    tokens: list[int]

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)

    @property
    def last_node(self) -> int:
        """The node whose row produced the bonus/correction token (0 = the root)."""
        return self.accepted_nodes[-1] if self.accepted_nodes else 0

    @property
    def source_rows(self) -> list[int]:
        """Per token, the tree row whose distribution it was drawn from: ``[0, *accepted]``.

        The target logprob of ``tokens[k]`` is ``log_softmax(target_logits[source_rows[k]])``.
        """
        return [0, *self.accepted_nodes]


def verify_greedy(tree: TokenTree, target_argmax: Sequence[int] | Tensor) -> VerifyResult:
    """Greedy verification: exactly the tokens plain greedy decoding produces.

    target_argmax: [n + 1], the target's greedy token after node i (from node i's row).
    A child is accepted when its token equals its parent's target argmax; siblings are tried
    in node order and the walk stops at the first node with no matching child.
    """
    argmax = target_argmax.tolist() if isinstance(target_argmax, Tensor) else list(target_argmax)
    if len(argmax) != tree.num_nodes:
        raise ValueError(
            f"target_argmax needs one entry per node ({tree.num_nodes}), got {len(argmax)}"
        )
    accepted: list[int] = []
    node = 0
    while True:
        want = argmax[node]
        nxt = next((c for c in tree.children[node] if tree.token_ids[c] == want), None)
        if nxt is None:
            break
        accepted.append(nxt)
        node = nxt
    return VerifyResult(accepted, [tree.token_ids[c] for c in accepted] + [int(argmax[node])])


def verify_chain_sampled(
    tree: TokenTree,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Speculative rejection sampling of a chain (Leviathan et al. 2023, Chen et al. 2023).

    Draft x_j (node j, parent j - 1) is accepted with probability min(1, p(x_j) / q(x_j)); at
    the first rejection the correction is drawn from norm(max(p - q, 0)) at that parent; if all
    are accepted the bonus is drawn from p at the last node. ``draft_probs=None``: q is a point
    mass on x_j, so acceptance is p(x_j) and the residual is p with x_j zeroed.
    target_probs, draft_probs: [n + 1, V] (see module docstring). One host sync for the
    acceptance decisions, one draw.
    """
    if not tree.is_chain:
        raise ValueError("verify_chain_sampled needs a chain; use verify_tree_sampled for trees")
    _check_shapes(tree, target_probs, draft_probs)
    n = tree.num_drafts
    device = target_probs.device
    u = torch.rand(n, generator=generator, device=device)  # [n]; node j uses u[j - 1]
    num_accepted = 0
    if n:
        rows = torch.arange(n, device=device)
        drafts = torch.tensor(tree.token_ids[1:], device=device)
        p_x = target_probs[rows, drafts].double()  # [n]
        # float64 so the decision matches verify_tree_sampled's Python-float arithmetic bit
        # for bit (a chain verified either way gives the same tokens from the same seed).
        q_x = (
            draft_probs[rows, drafts].double() if draft_probs is not None else torch.ones_like(p_x)
        )
        accept = u.double() * q_x < p_x
        num_accepted = int(accept.cumprod(0).sum())
    if num_accepted == n:
        probs = target_probs[n]
    elif draft_probs is not None:
        probs = _normalized(
            (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_(min=0),
            target_probs[num_accepted],
        )
    else:
        probs = _without(target_probs[num_accepted], [tree.token_ids[num_accepted + 1]])
    accepted = list(range(1, num_accepted + 1))
    return VerifyResult(accepted, [*tree.token_ids[1 : num_accepted + 1], _draw(probs, generator)])


def verify_tree_sampled(
    tree: TokenTree,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None,
    mode: TreeMode,
) -> VerifyResult:
    """Lossless verification of a tree for a sampled request, walking down from the root.

    At the current node with target p, children are tried in node order:

    - mode "sampled" (SpecInfer multi-step speculative sampling; children i.i.d. from
      q = draft_probs[node]): accept child x with min(1, p(x) / q(x)); on rejection
      p <- norm(max(p - q, 0)) and try the next child.
    - mode "deterministic" (n-gram / top-k children; draft_probs must be None): accept child x
      with the current p(x); on rejection p(x) <- 0, renormalise, try the next child.

    An accepted child becomes the current node (p = its target row). When every child of the
    current node is rejected, the correction is drawn from the final residual p; at a leaf the
    bonus is drawn from its target row. On a chain both modes equal ``verify_chain_sampled``
    (with the same generator state, the same tokens). Why the modes must match how the
    children were drafted: see the module docstring.
    target_probs, draft_probs: [n + 1, V].
    """
    if mode == "sampled":
        if draft_probs is None:
            raise ValueError('mode "sampled" needs draft_probs (the q each child was drawn from)')
        return _verify_tree_multistep(tree, target_probs, draft_probs, generator)
    if mode == "deterministic":
        if draft_probs is not None:
            raise ValueError(
                'mode "deterministic" treats children as point masses: pass draft_probs=None'
            )
        return _verify_tree_deterministic(tree, target_probs, generator)
    raise ValueError(f'mode must be "sampled" or "deterministic", got {mode!r}')


def verify(
    tree: TokenTree,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None,
    *,
    greedy: bool,
    kind: Literal["deterministic", "sampled"],
) -> VerifyResult:
    """The right rule for one request: greedy, chain or tree, as its drafter's ``kind`` says.

    Greedy requests use the argmax of target_probs (one-hot rows from ``processed_probs``) and
    consume no random numbers. ``kind`` "sampled" needs draft_probs; "deterministic" ignores it.
    """
    if greedy:
        return verify_greedy(tree, target_probs.argmax(dim=-1))
    q = draft_probs if kind == "sampled" else None
    if kind == "sampled" and q is None:
        raise ValueError('drafts of kind "sampled" need draft_probs to be verified losslessly')
    if tree.is_chain:
        return verify_chain_sampled(tree, target_probs, q, generator)
    return verify_tree_sampled(tree, target_probs, q, generator, kind)


# ---------------------------------------------------------------------------------------------
# Tree walks
# ---------------------------------------------------------------------------------------------


def _verify_tree_multistep(
    tree: TokenTree, target_probs: Tensor, draft_probs: Tensor, generator: torch.Generator | None
) -> VerifyResult:
    _check_shapes(tree, target_probs, draft_probs)
    u = torch.rand(tree.num_drafts, generator=generator, device=target_probs.device).tolist()
    accepted: list[int] = []
    node = 0
    p = target_probs[0]  # [V], read-only until replaced
    while True:
        q = draft_probs[node]
        for child in tree.children[node]:
            x = tree.token_ids[child]
            p_x, q_x = torch.stack((p[x], q[x])).double().tolist()
            if u[child - 1] * q_x < p_x:
                accepted.append(child)
                node = child
                p = target_probs[child]
                break
            p = _normalized((p - q).clamp_(min=0), target_probs[node])
        else:  # no child accepted (or a leaf): draw from the residual / the leaf's row
            break
    tokens = [tree.token_ids[c] for c in accepted]
    return VerifyResult(accepted, [*tokens, _draw(p, generator)])


def _verify_tree_deterministic(
    tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None
) -> VerifyResult:
    _check_shapes(tree, target_probs, None)
    n = tree.num_drafts
    device = target_probs.device
    u = torch.rand(n, generator=generator, device=device).tolist()
    # p(x) of every node under its parent's target row, in one gather and one sync. With
    # point-mass children the residual after rejecting x_1..x_k is p with those zeroed, so
    # the current p(x) is p(x) / (1 - removed mass): no [V] vector work until the final draw.
    if n:
        parents = torch.tensor(tree.parents[1:], device=device)
        drafts = torch.tensor(tree.token_ids[1:], device=device)
        p_node = target_probs[parents, drafts].double().tolist()
    accepted: list[int] = []
    node = 0
    while True:
        removed = 0.0
        rejected: list[int] = []
        for child in tree.children[node]:
            x = tree.token_ids[child]
            if x in rejected:  # a repeated sibling: its current probability is 0
                continue
            # accept w.p. p(x) / (1 - removed), without the division
            if u[child - 1] * (1.0 - removed) < p_node[child - 1]:
                accepted.append(child)
                node = child
                break
            removed += p_node[child - 1]
            rejected.append(x)
        else:
            break
    probs = _without(target_probs[node], rejected) if rejected else target_probs[node]
    tokens = [tree.token_ids[c] for c in accepted]
    return VerifyResult(accepted, [*tokens, _draw(probs, generator)])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _normalized(residual: Tensor, fallback: Tensor) -> Tensor:
    """residual / sum; ``fallback`` (the node's target row) when the residual has no mass.

    A zero residual means p <= q everywhere, i.e. p == q, where rejection has probability 0:
    reaching it is float rounding, and p itself is then the right distribution.
    """
    total = residual.sum()
    if float(total) <= 0.0:
        return fallback
    return residual / total


def _without(probs: Tensor, tokens: list[int]) -> Tensor:
    """probs with ``tokens`` zeroed, renormalised. [V] -> new [V]."""
    out = probs.clone()
    out[torch.tensor(tokens, device=probs.device)] = 0.0
    return _normalized(out, probs)


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` [V] via the sampler's exponential trick and ``generator``."""
    return int(draw(probs.unsqueeze(0), [generator])[0])


def _check_shapes(tree: TokenTree, target_probs: Tensor, draft_probs: Tensor | None) -> None:
    if target_probs.dim() != 2 or target_probs.shape[0] != tree.num_nodes:
        raise ValueError(
            f"target_probs must be [num_nodes={tree.num_nodes}, V], got {tuple(target_probs.shape)}"
        )
    if draft_probs is not None and draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"draft_probs must match target_probs' shape {tuple(target_probs.shape)}, "
            f"got {tuple(draft_probs.shape)}"
        )
