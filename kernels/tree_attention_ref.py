"""Plain-torch reference of `kernels.tree_attention.tree_attention` (same arguments).

Kept apart from the kernel module so that it imports no triton: the CPU path and the tests'
expected values need only torch. Mask format: kernels/tree_masks.py.
"""

from __future__ import annotations

import math

import torch

from kernels.tree_masks import tree_mask_dense


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_tables: torch.Tensor,
    mask_words: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Paged prefix + tree/causal attention, one request at a time in fp32; out [T, Hq, D] in
    q's dtype. Shapes and index map: see kernels/tree_attention.py."""
    _, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(q)
    cu = cu_q.tolist()
    for r in range(len(cu) - 1):
        q0, q1 = cu[r], cu[r + 1]
        n_new = q1 - q0
        if n_new == 0:
            continue
        p = int(prefix_lens[r])
        pos = torch.arange(p + n_new, device=q.device)
        blocks = block_tables[r, pos // bs].long()
        k = k_cache[blocks, pos % bs].float()  # [kv, Hkv, D]
        v = v_cache[blocks, pos % bs].float()
        allowed = torch.ones(n_new, p + n_new, dtype=torch.bool, device=q.device)
        causal = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril()
        if mask_words is not None:
            causal &= tree_mask_dense(mask_words[q0:q1], n_new)
        allowed[:, p:] = causal
        g = hq // hkv
        k = k.repeat_interleave(g, dim=1)  # [kv, Hq, D]
        v = v.repeat_interleave(g, dim=1)
        s = torch.einsum("thd,nhd->htn", q[q0:q1].float(), k) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        o = torch.einsum("htn,nhd->thd", s.softmax(-1), v)
        out[q0:q1] = o.to(q.dtype)
    return out
