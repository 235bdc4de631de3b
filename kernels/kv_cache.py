"""Paged KV cache maintenance: slot-mapped write, accepted-path compaction, block copy.

Cache layout per layer: [NB, BS, Hkv, D]; slot s lives at block s // BS, offset s % BS.
Compaction and block copy work on all layers at once. They take either one stacked tensor
[L, NB, BS, Hkv, D] or a sequence of per-layer [NB, BS, Hkv, D] tensors (K and V caches of
every layer, in any order); a sequence whose tensors are equally spaced views of one storage
(e.g. kv[l, 0] / kv[l, 1] of one [L, 2, NB, BS, Hkv, D] allocation) becomes a single launch,
anything else one launch per tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# (a) write through a slot mapping


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    block_size,
    num_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)  # int64; -1 = padding row, nothing written
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # The scalar test is broadcast by hand: in the interpreter, `block_mask & scalar_bool`
    # gives a mask that tl.load rejects ("mask has unsupported dtype", triton 3.9, measured).
    keep = (offs_h[:, None] * 0 + slot) >= 0
    m = (offs_h[:, None] < num_heads) & (offs_d[None, :] < head_dim) & keep
    blk = slot // block_size
    off = slot % block_size
    k = tl.load(
        k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=m
    )
    v = tl.load(
        v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=m
    )
    tl.store(
        k_cache_ptr
        + blk * stride_kcb
        + off * stride_kcs
        + offs_h[:, None] * stride_kch
        + offs_d[None, :] * stride_kcd,
        k,
        mask=m,
    )
    tl.store(
        v_cache_ptr
        + blk * stride_vcb
        + off * stride_vcs
        + offs_h[:, None] * stride_vch
        + offs_d[None, :] * stride_vcd,
        v,
        mask=m,
    )


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] (any strides, e.g. views of a fused qkv) -> caches [NB, BS, Hkv, D].

    slot_mapping int64 [T]: destination slot per row, -1 = skip (padding).
    """
    _check(
        k.dim() == 3 and v.shape == k.shape,
        f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    _check(
        k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
        f"caches must both be [NB, BS, Hkv, D], got {tuple(k_cache.shape)} and "
        f"{tuple(v_cache.shape)}",
    )
    t_rows, hkv, d = k.shape
    _check(
        tuple(k_cache.shape[2:]) == (hkv, d),
        f"k is [T, {hkv}, {d}] but the cache holds [.., .., {k_cache.shape[2]}, "
        f"{k_cache.shape[3]}]",
    )
    _check(
        k.dtype == v.dtype == k_cache.dtype == v_cache.dtype,
        f"dtypes differ: k {k.dtype}, v {v.dtype}, caches {k_cache.dtype}/{v_cache.dtype}; "
        "cast k/v to the cache dtype first",
    )
    _check(
        slot_mapping.dtype == torch.int64 and tuple(slot_mapping.shape) == (t_rows,),
        f"slot_mapping must be int64 [{t_rows}], got {slot_mapping.dtype} "
        f"{tuple(slot_mapping.shape)}",
    )
    for name, x in (
        ("v", v),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("slot_mapping", slot_mapping),
    ):
        _check(x.device == k.device, f"{name} is on {x.device}, k on {k.device}")
    if t_rows == 0:
        return
    block_h, block_d = triton.next_power_of_2(hkv), triton.next_power_of_2(d)
    _write_kv_kernel[(t_rows,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_cache.shape[1],
        hkv,
        d,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d <= 2048 else 8,
    )


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference of `write_kv` (in place)."""
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    s = slot_mapping[keep]
    k_cache[s // bs, s % bs] = k[keep]
    v_cache[s // bs, s % bs] = v[keep]


# --------------------------------------------------------------------------------------------
# stacking per-layer caches into one [L, NB, BS, Hkv, D] view


def _as_layers(caches: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One [L, NB, BS, Hkv, D] tensor (single launch) or several (one launch each)."""
    if isinstance(caches, torch.Tensor):
        _check(
            caches.dim() in (4, 5),
            f"cache must be [NB, BS, Hkv, D] or [L, NB, BS, Hkv, D], got {tuple(caches.shape)}",
        )
        return [caches if caches.dim() == 5 else caches.unsqueeze(0)]
    caches = list(caches)
    _check(len(caches) > 0, "no caches given")
    first = caches[0]
    for c in caches:
        _check(c.dim() == 4, f"each cache must be [NB, BS, Hkv, D], got {tuple(c.shape)}")
        _check(
            c.shape == first.shape and c.dtype == first.dtype and c.device == first.device,
            "all caches must share shape, dtype and device",
        )
    if len(caches) == 1:
        return [first.unsqueeze(0)]
    same_storage = all(
        c.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and c.stride() == first.stride()
        for c in caches
    )
    if same_storage:
        offs = [c.storage_offset() for c in caches]
        delta = offs[1] - offs[0]
        if delta > 0 and all(b - a == delta for a, b in itertools.pairwise(offs)):
            return [
                first.as_strided(
                    (len(caches), *first.shape), (delta, *first.stride()), first.storage_offset()
                )
            ]
    return [c.unsqueeze(0) for c in caches]


# --------------------------------------------------------------------------------------------
# (b) in-place compaction of accepted tree paths


@triton.jit
def _compact_kv_kernel(
    cache_ptr,
    src_ptr,
    dst_ptr,
    cu_ptr,
    block_size,
    num_heads,
    head_dim,
    stride_l,
    stride_b,
    stride_s,
    stride_h,
    stride_d,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program per (request, cache tensor): the copies of one request run IN ORDER.
    r = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    base = cache_ptr + layer * stride_l
    start = tl.load(cu_ptr + r)
    end = tl.load(cu_ptr + r + 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_h[:, None] < num_heads) & (offs_d[None, :] < head_dim)
    inner = offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    for i in range(start, end):
        src = tl.load(src_ptr + i)  # int64 slots
        dst = tl.load(dst_ptr + i)
        x = tl.load(
            base + (src // block_size) * stride_b + (src % block_size) * stride_s + inner, mask=m
        )
        tl.store(
            base + (dst // block_size) * stride_b + (dst % block_size) * stride_s + inner,
            x,
            mask=m & ((offs_h[:, None] * 0 + src) != dst),
        )  # see _write_kv_kernel
        # Copy i+1 may read a slot that copy i just wrote through another thread of this
        # program (when the layouts differ): order them.
        tl.debug_barrier()


def compact_kv(
    caches: torch.Tensor | Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    cu_paths: torch.Tensor,
) -> None:
    """Move each request's accepted path to consecutive slots, in place, in every cache.

    src_slots / dst_slots int64 [N]: for request r, entries cu_paths[r]:cu_paths[r+1] are the
    accepted nodes' slots along the path (root first) and the consecutive slots after the
    prefix they move to. cu_paths int32 [R + 1].

    Why one ordered program per request, and not one program per copy: nodes are stored in
    topological order at prefix + index and the path visits increasing indices a_0 < a_1 < ..,
    so its k-th node moves from a_k >= k to k. Copying k = 0, 1, .. in order is safe (copy k
    only writes position k <= a_k' for every later k'); done in parallel, copy k can read
    position a_k after copy k' = a_k has already overwritten it (path 0,2,3: copy 1 reads
    position 2 while copy 2 writes position 2). The interpreter runs programs one after
    another and cannot show that race; a GPU can. Different requests (disjoint slots) and
    different layers are independent, so they run as separate programs.
    """
    _check(
        src_slots.dtype == torch.int64
        and dst_slots.dtype == torch.int64
        and src_slots.shape == dst_slots.shape
        and src_slots.dim() == 1,
        "src_slots and dst_slots must be int64 [N] of equal length",
    )
    _check(
        cu_paths.dtype == torch.int32 and cu_paths.dim() == 1 and cu_paths.numel() >= 1,
        "cu_paths must be int32 [R + 1]",
    )
    layers = _as_layers(caches)
    r = cu_paths.numel() - 1
    if r == 0 or src_slots.numel() == 0:
        return
    for c in layers:
        _check(
            c.device == src_slots.device == dst_slots.device == cu_paths.device,
            "caches, slots and cu_paths must be on one device",
        )
        _, _, bs, hkv, d = c.shape
        block_h, block_d = triton.next_power_of_2(hkv), triton.next_power_of_2(d)
        _compact_kv_kernel[(r, c.shape[0])](
            c,
            src_slots,
            dst_slots,
            cu_paths,
            bs,
            hkv,
            d,
            *c.stride(),
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=4,
        )


def compact_kv_ref(
    caches: torch.Tensor | Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    cu_paths: torch.Tensor,
) -> None:
    """Reference of `compact_kv`: the same ordered copies, one slot at a time."""
    tensors = [caches] if isinstance(caches, torch.Tensor) else list(caches)
    src, dst = src_slots.tolist(), dst_slots.tolist()
    for c in tensors:
        c5 = c if c.dim() == 5 else c.unsqueeze(0)
        bs = c5.shape[2]
        for i in range(len(src)):  # within a request, order matters; across requests it doesn't
            c5[:, dst[i] // bs, dst[i] % bs] = c5[:, src[i] // bs, src[i] % bs]


# --------------------------------------------------------------------------------------------
# (c) block copy (copy-on-write)


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    src_ptr,
    dst_ptr,
    block_numel,
    stride_l,
    stride_b,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < block_numel
    base = cache_ptr + layer * stride_l
    x = tl.load(base + src * stride_b + offs, mask=m)
    tl.store(base + dst * stride_b + offs, x, mask=m)


def copy_blocks(
    caches: torch.Tensor | Sequence[torch.Tensor],
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
) -> None:
    """Copy whole blocks src_blocks[i] -> dst_blocks[i] (int32/int64 [P]) in every cache.

    A dst block must not also be a src block of the same call (pairs run in parallel).
    Each block's [BS, Hkv, D] must be contiguous (true for any cache allocated in one piece).
    """
    _check(
        src_blocks.dim() == 1 and src_blocks.shape == dst_blocks.shape,
        "src_blocks and dst_blocks must be [P] of equal length",
    )
    _check(
        src_blocks.dtype in (torch.int32, torch.int64)
        and dst_blocks.dtype in (torch.int32, torch.int64),
        "block ids must be int32/int64",
    )
    layers = _as_layers(caches)
    p = src_blocks.numel()
    if p == 0:
        return
    for c in layers:
        _check(
            c.device == src_blocks.device == dst_blocks.device,
            "caches and block ids must be on one device",
        )
        _, _, bs, hkv, d = c.shape
        _check(
            c.stride(4) == 1 and c.stride(3) == d and c.stride(2) == hkv * d,
            "each block [BS, Hkv, D] must be contiguous",
        )
        numel = bs * hkv * d
        block = min(4096, triton.next_power_of_2(numel))
        grid = (p, c.shape[0], triton.cdiv(numel, block))
        _copy_blocks_kernel[grid](
            c, src_blocks, dst_blocks, numel, c.stride(0), c.stride(1), BLOCK=block, num_warps=4
        )


def copy_blocks_ref(
    caches: torch.Tensor | Sequence[torch.Tensor],
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
) -> None:
    """Reference of `copy_blocks` (in place)."""
    tensors = [caches] if isinstance(caches, torch.Tensor) else list(caches)
    for c in tensors:
        if c.dim() == 5:
            c[:, dst_blocks.long()] = c[:, src_blocks.long()]
        else:
            c[dst_blocks.long()] = c[src_blocks.long()]
