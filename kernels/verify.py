"""Fused greedy tree verification: the longest draft path the target agrees with.

Per request r, nodes cu_q[r]:cu_q[r+1] in topological order; node 0 is the last verified token.
Inputs (same layout as tree_attention's query rows):

    draft_tokens  int32/int64 [T]   token of each node (node 0's is ignored)
    target_argmax int32/int64 [T]   the target's greedy next token after each node
    mask_words    int32 [T, W]      ancestor-or-self bit words; None = chain

Node i > 0 is accepted when its parent is accepted and draft_tokens[i] equals
target_argmax[parent(i)]. The result is the deepest accepted node (smallest index on a tie),
its path from the root, and the bonus token target_argmax[last]. Greedy decoding would produce
exactly the path's draft tokens followed by the bonus token.

The kernel needs no sequential walk: parent(i) = the largest j < i whose bit is set in row i,
"all ancestors locally accepted" is one masked reduction over the [N, N] ancestor tile, and the
path is the ancestor row of the chosen node, ranked by a cumulative sum. One program per request.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _verify_greedy_kernel(
    cu_q_ptr,
    draft_ptr,
    argmax_ptr,
    mask_ptr,
    num_acc_ptr,
    path_ptr,
    bonus_ptr,
    stride_mask,
    stride_path,
    max_q,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(cu_q_ptr + r)
    n = tl.load(cu_q_ptr + r + 1) - start
    offs = tl.arange(0, BLOCK)
    i = offs[:, None]  # [B, 1] node
    j = offs[None, :]  # [1, B] candidate ancestor
    ok_i = offs < n
    valid = (i < n) & (j < n) & (j <= i)
    if HAS_MASK:
        words = tl.load(
            mask_ptr + (start + i).to(tl.int64) * stride_mask + j // 32, mask=valid, other=0
        )
        anc = valid & (((words >> (j % 32)) & 1) != 0)  # [B, B] j ancestor-or-self of i
    else:
        anc = valid
    parent = tl.max(tl.where(anc & (j < i), j, -1), 1)  # [B]; -1 for the root
    tok = tl.load(draft_ptr + start + offs, mask=ok_i, other=0)
    par_pred = tl.load(argmax_ptr + start + tl.maximum(parent, 0), mask=ok_i, other=0)
    local_ok = (offs == 0) | (tok == par_pred)  # [B]
    bad = tl.sum(tl.where(anc & (local_ok[None, :] == 0), 1, 0), 1)
    depth = tl.sum(anc.to(tl.int32), 1)  # root has depth 1
    accepted = ok_i & (bad == 0)
    key = tl.where(accepted, depth * (2 * BLOCK) + (2 * BLOCK - 1 - offs), -1)
    best_key = tl.max(key, 0)
    best = 2 * BLOCK - 1 - best_key % (2 * BLOCK)
    n_acc = best_key // (2 * BLOCK)
    row = tl.sum(tl.where(i == best, anc.to(tl.int32), 0), 0)  # [B] path membership
    rank = tl.cumsum(row, 0) - 1
    # out position p holds the path node j with rank j == p (one store: no write-write ordering)
    sel = (row[None, :] != 0) & (rank[None, :] == i)  # [p, j]
    node = tl.sum(tl.where(sel, j, 0), 1)
    node = tl.where(offs < n_acc, node, -1)
    tl.store(path_ptr + r.to(tl.int64) * stride_path + offs, node, mask=offs < max_q)
    tl.store(num_acc_ptr + r, n_acc)
    tl.store(bonus_ptr + r, tl.load(argmax_ptr + start + best))


def verify_greedy(
    cu_q: torch.Tensor,
    draft_tokens: torch.Tensor,
    target_argmax: torch.Tensor,
    mask_words: torch.Tensor | None = None,
    *,
    max_q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (num_accepted int32 [R] incl. the root, path int32 [R, max_q] local node indices
    root first, -1 after the end, bonus [R] in target_argmax's dtype)."""
    if cu_q.dtype != torch.int32 or cu_q.dim() != 1 or cu_q.numel() < 2:
        raise ValueError("cu_q must be int32 [R + 1]")
    t = int(draft_tokens.numel())
    if draft_tokens.shape != (t,) or target_argmax.shape != (t,):
        raise ValueError(
            f"draft_tokens and target_argmax must both be [T], got "
            f"{tuple(draft_tokens.shape)} and {tuple(target_argmax.shape)}"
        )
    if draft_tokens.dtype != target_argmax.dtype or draft_tokens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError("draft_tokens and target_argmax must share an int32/int64 dtype")
    r = cu_q.numel() - 1
    if max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max().item())
    if mask_words is not None and (
        mask_words.dtype != torch.int32
        or mask_words.dim() != 2
        or mask_words.shape[0] != t
        or mask_words.shape[1] * 32 < max_q_len
        or mask_words.stride(1) != 1
    ):
        raise ValueError(f"mask_words must be contiguous int32 [T={t}, ceil(max_q/32)]")
    if max_q_len < 1:
        raise ValueError("every request needs at least its root node")
    dev = cu_q.device
    num_acc = torch.empty(r, dtype=torch.int32, device=dev)
    path = torch.empty(r, max_q_len, dtype=torch.int32, device=dev)
    bonus = torch.empty(r, dtype=target_argmax.dtype, device=dev)
    block = max(16, triton.next_power_of_2(max_q_len))
    _verify_greedy_kernel[(r,)](
        cu_q,
        draft_tokens,
        target_argmax,
        mask_words if mask_words is not None else cu_q,
        num_acc,
        path,
        bonus,
        mask_words.stride(0) if mask_words is not None else 0,
        path.stride(0),
        max_q_len,
        HAS_MASK=mask_words is not None,
        BLOCK=block,
        num_warps=4,
    )
    return num_acc, path, bonus


def verify_greedy_ref(
    cu_q: torch.Tensor,
    draft_tokens: torch.Tensor,
    target_argmax: torch.Tensor,
    mask_words: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of `verify_greedy`: walk the tree node by node."""
    cu = cu_q.tolist()
    r = len(cu) - 1
    max_q = max(b - a for a, b in itertools.pairwise(cu))
    num_acc = torch.zeros(r, dtype=torch.int32)
    path = torch.full((r, max_q), -1, dtype=torch.int32)
    bonus = torch.zeros(r, dtype=target_argmax.dtype)
    tok, am = draft_tokens.tolist(), target_argmax.tolist()
    for req in range(r):
        s, n = cu[req], cu[req + 1] - cu[req]
        parent = []
        for i in range(n):
            if mask_words is None:
                parent.append(i - 1)
                continue
            anc = [k for k in range(i) if (int(mask_words[s + i, k // 32]) >> (k % 32)) & 1]
            parent.append(max(anc) if anc else -1)
        acc, depth = [True], [1]
        for i in range(1, n):
            p = parent[i]
            acc.append(acc[p] and tok[s + i] == am[s + p])
            depth.append(depth[p] + 1)
        best = max((i for i in range(n) if acc[i]), key=lambda i: (depth[i], -i))
        nodes = []
        k = best
        while k >= 0:
            nodes.append(k)
            k = parent[k]
        nodes.reverse()
        num_acc[req] = len(nodes)
        path[req, : len(nodes)] = torch.tensor(nodes, dtype=torch.int32)
        bonus[req] = am[s + best]
    return num_acc.to(cu_q.device), path.to(cu_q.device), bonus.to(cu_q.device)


def compile_cases() -> list[tuple]:
    """Configs for kernels.compile_gate."""
    return [
        (
            f"verify_greedy[{b}]",
            _verify_greedy_kernel,
            {
                "cu_q_ptr": "*i32",
                "draft_ptr": "*i64",
                "argmax_ptr": "*i64",
                "mask_ptr": "*i32",
                "num_acc_ptr": "*i32",
                "path_ptr": "*i32",
                "bonus_ptr": "*i64",
            },
            {"HAS_MASK": True, "BLOCK": b},
            {"num_warps": 4},
        )
        for b in (16, 64)
    ]
