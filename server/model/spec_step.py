"""The runner's half of speculative decoding: tree inputs, verification, KV compaction.

Per decoding request with a draft tree of n drafts, the forward computes n + 1 rows: node 0 is
the request's last known token, node i sits at position ``prefix_len + depth(i)`` (rotary) and
cache slot ``prefix_len + i`` (write-first: every node's K/V is written before attention, and
each row attends to the prefix plus its ancestors). Verification walks the tree with the target
rows; then the accepted path's K/V moves from slots ``prefix_len + node`` to the consecutive
slots ``prefix_len + depth`` so the cache looks exactly as if the accepted tokens had been
decoded one by one. Rejected slots are left as they are and overwritten later.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from server.engine.plan import StepPlan
from server.engine.request import Logprob, Request
from server.model.sampler import compute_logprobs, processed_logits, processed_probs
from server.model.top_k_cpu import top_k_probs
from server.spec_decode.drafter import DraftKind, TopTokens
from server.spec_decode.tree import TokenTree
from server.spec_decode.verify import VerifyResult, verify, verify_greedy


def tree_positions(tree: TokenTree, prefix_len: int) -> list[int]:
    return [prefix_len + d for d in tree.depths]


def verify_tree(
    logits: torch.Tensor,
    request: Request,
    tree: TokenTree,
    generator: torch.Generator | None,
    drafter_kind: DraftKind,
    draft_probs: torch.Tensor | None = None,
) -> VerifyResult:
    """logits [n+1, V] float32: the target's rows for the tree's nodes, in node order.

    The target distribution is the request's processed one (temperature, top-k/p, min-p,
    logit bias); ``verify`` picks the exact rule: greedy path, or the rejection rule matching
    how the drafter made the children.
    """
    requests = [request] * logits.shape[0]
    if request.sampling_params.greedy:
        # The greedy token is the argmax of the processed logits (bias and penalties apply).
        # ``verify`` would take the same argmax from processed_probs' one-hot rows; skipping
        # the softmax and the one-hot rows saves ~1 ms a verifying request on a CPU.
        return verify_greedy(tree, processed_logits(logits, requests).argmax(dim=-1))
    probs = processed_probs(logits, requests)  # [n+1, V]
    return verify(
        tree,
        probs,
        draft_probs,
        generator,
        greedy=request.sampling_params.greedy,
        kind=drafter_kind,
    )


def path_logprobs(logits: torch.Tensor, result: VerifyResult, num_top: int) -> list[Logprob]:
    """The target's logprobs of each emitted token: token j is predicted by the row of the
    path's j-th node (the root for the first token)."""
    rows = torch.tensor(result.source_rows, device=logits.device)
    return compute_logprobs(logits[rows], result.tokens, num_top)


def compaction_slots(
    block_ids: Sequence[int], block_size: int, prefix_len: int, accepted_nodes: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(source slots, destination slots) moving accepted node i (at depth d along the path,
    d = 1, 2, ...) from position prefix_len + i to prefix_len + d. Pairs with i == d (every
    node of a chain) need no copy and are left out."""
    src: list[int] = []
    dst: list[int] = []
    for depth, node in enumerate(accepted_nodes, start=1):
        if node == depth:
            continue
        for pos, out in ((prefix_len + node, src), (prefix_len + depth, dst)):
            out.append(block_ids[pos // block_size] * block_size + pos % block_size)
    return src, dst


def compact_kv(kv_cache: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """Copies slots src -> dst for all layers, K and V.

    kv_cache: [L, 2, num_blocks, block_size, Hk, D]. Along one path src >= dst position-wise
    and pairs can chain (a destination may be a later pair's source), so all sources are read
    (gathered into a new tensor) before any destination is written.
    """
    if not src:
        return
    flat = kv_cache.view(kv_cache.shape[0], 2, -1, *kv_cache.shape[-2:])  # [L, 2, slots, Hk, D]
    device = kv_cache.device
    flat[:, :, torch.tensor(dst, device=device)] = flat[:, :, torch.tensor(src, device=device)]


def top_tokens(
    logits: torch.Tensor,
    plan: StepPlan,
    sampled: Sequence[tuple[Request, int]],
    verified: Sequence[tuple[Request, int]],
    k: int,
) -> TopTokens:
    """The target's top-k next tokens at every plain-decode row (``sampled``: request, its
    logit row) and every draft-tree node (``verified``: request, its tree's first row), for a
    drafter that recycles them. One top-k over all rows (specd's kernel on CPU) and one copy to
    the host per step."""
    request_ids: list[str] = []
    tokens: list[int] = []
    prev_tokens: list[int] = []
    rows: list[int] = []
    for r, row in sampled:
        ids = r.all_token_ids
        request_ids.append(r.request_id)
        tokens.append(ids[-1])  # a sampling row computes the last known token
        prev_tokens.append(ids[-2] if len(ids) > 1 else -1)
        rows.append(row)
    for r, first_row in verified:
        tree = plan.spec_trees[r.request_id]
        ids = r.all_token_ids
        request_ids += [r.request_id] * tree.num_nodes
        tokens += tree.token_ids
        prev_tokens.append(ids[-2] if len(ids) > 1 else -1)
        prev_tokens += [tree.token_ids[p] for p in tree.parents[1:]]
        rows += range(first_row, first_row + tree.num_nodes)
    first = rows[0] if rows else 0
    if rows == list(range(first, first + len(rows))):
        # One run of rows (a step with no drafts: most steps) is a view; gathering copies
        # them first, which costs as much as the top-k itself (0.09 ms of 4 rows x 49k).
        picked = logits[first : first + len(rows)].contiguous()
    else:
        picked = logits[torch.tensor(rows, device=logits.device)]
    ids, probs = top_k_probs(picked, k)
    return TopTokens(
        tuple(request_ids),
        np.asarray(tokens, dtype=np.int64),
        np.asarray(prev_tokens, dtype=np.int64),
        ids.cpu().numpy(),
        probs.cpu().numpy(),
    )
