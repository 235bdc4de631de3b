"""Paged tree attention: prefill chunks, plain decode and tree verification in one kernel.

Inputs, per layer (T = query rows of the whole step, R = requests):

    q            [T, Hq, D]            query rows of all requests, flattened
    k_cache      [NB, BS, Hkv, D]      paged cache; this step's K/V are ALREADY written
    v_cache      [NB, BS, Hkv, D]
    cu_q         int32 [R + 1]         rows of request r are q[cu_q[r]:cu_q[r+1]]
    prefix_lens  int32 [R]             tokens in the cache before this step's new tokens
    block_tables int32 [R, MB]         logical block -> physical block id
    mask_words   int32 [T, W] or None  W = ceil(max_q / 32); bit j of word j // 32 of row i set
                                       when new token j is an ancestor-or-self of row i;
                                       None = causal (prefill chunks, chains, decode)

Index map: request r has kv length prefix_lens[r] + q_len(r); its new token i sits at kv index
prefix_lens[r] + i, physical slot block_tables[r, n // BS] * BS + n % BS. Every row sees the
whole prefix; among the new tokens row i sees token j iff j <= i and (no mask or bit j set).
Trees are topologically ordered (ancestors come first), so j <= i never removes a true ancestor
and it bounds the new-token loop of a row tile at the tile's last row.

GQA: one program per (query tile, request, KV head, split); its BLOCK_M = BLOCK_Q * GROUP_PAD
rows are (token, query head of the group) pairs, so each K/V tile is loaded once for all G query
heads of that KV head. Softmax is online in fp32 (exp2 domain).

Split-KV: with few requests and long prefixes, (q tiles x R x Hkv) programs leave most SMs idle
(8B decode at batch 1: 8 programs on 132 SMs). The prefix is then cut into NUM_SPLITS ranges;
each split writes a normalised partial output and its log2-sum-exp, and a second kernel merges
them. The new-token (tree) part is handled by the last split, whose prefix range is the emptiest
for requests shorter than the longest.

Beside it: the plain-torch reference in kernels/tree_attention_ref.py and the mask-word helpers
(ancestor_words, causal_mask_words, pack_mask_words, tree_mask_dense) in kernels/tree_masks.py,
both free of triton.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
# Finite "minus infinity" for the running max: a row that has seen nothing yet keeps
# alpha = exp2(m_old - m_new) = 1 instead of exp2(-inf + inf) = nan.
_NEG_BIG = -1.0e30


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,  # acc [M, BD] fp32, m_i/l_i [M] fp32, q [M, BD]
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    bt_row,
    kvh,
    offs_n,
    n_ok,
    visible,
    offs_d,
    d_ok,
    block_size,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Physical slot of every kv index in the tile; block ids go to int64 before the multiply
    # (block * stride_kb overflows int32 on pools over 2^31 elements).
    blk = tl.load(block_tables_ptr + bt_row + offs_n // block_size, mask=n_ok, other=0)
    blk = blk.to(tl.int64)
    in_blk = (offs_n % block_size).to(tl.int64)
    kv_mask = n_ok[None, :] & d_ok[:, None]
    # kT [BD, N]: loaded transposed so the dot needs no permute.
    k_off = (
        blk[None, :] * stride_kb
        + in_blk[None, :] * stride_ks
        + kvh * stride_kh
        + offs_d[:, None] * stride_kd
    )
    kt = tl.load(k_cache_ptr + k_off, mask=kv_mask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 units
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = (
        blk[:, None] * stride_vb
        + in_blk[:, None] * stride_vs
        + kvh * stride_vh
        + offs_d[None, :] * stride_vd
    )
    v = tl.load(v_cache_ptr + v_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    cu_q_ptr,
    prefix_lens_ptr,
    block_tables_ptr,
    mask_ptr,
    scale,
    block_size,
    num_kv_heads,
    tiles_per_split,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    stride_mask,
    stride_pot,
    stride_poh,
    stride_pos,  # part_o [T, Hq, S, BD] fp32, last dim contiguous
    stride_plt,
    stride_plh,  # part_lse [T, Hq, S] fp32, last dim contiguous
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    pid_q = tl.program_id(0)
    pid_rh = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = pid_rh // num_kv_heads
    kvh = pid_rh % num_kv_heads

    q_start = tl.load(cu_q_ptr + r)
    q_len = tl.load(cu_q_ptr + r + 1) - q_start
    prefix_len = tl.load(prefix_lens_ptr + r)
    bt_row = r.to(tl.int64) * stride_bt

    tile_q0 = pid_q * BLOCK_Q
    tile_live = tile_q0 < q_len
    offs_m = tl.arange(0, BLOCK_M)
    tok = tile_q0 + offs_m // GROUP_PAD  # [M] new-token index of the row within its request
    g = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    qh = kvh * GROUP + g
    row_t = (q_start + tok).to(tl.int64)  # [M] global query row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head dims 80/96 are padded to 128 with this mask

    q = tl.load(
        q_ptr + row_t[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # fold log2(e): exp2 below

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # ---- prefix part: everything visible; this split's range of whole BLOCK_N tiles.
    lo = pid_s * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, prefix_len)
    hi = tl.where(tile_live, hi, lo)  # dead tile (request shorter than the grid): no work
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        visible = row_ok[:, None] & n_ok[None, :]
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr,
            bt_row,
            kvh,
            offs_n,
            n_ok,
            visible,
            offs_d,
            d_ok,
            block_size,
            qk_scale,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_vd,
            UPCAST,
            DOT_PRECISION,
        )

    # ---- new tokens (chain / tree / prefill chunk): only the last split. Rows of this tile
    # have token index < tile_q0 + BLOCK_Q, and see only j <= own index.
    new_hi = tl.minimum(q_len, tile_q0 + BLOCK_Q)
    new_hi = tl.where(tile_live & (pid_s == NUM_SPLITS - 1), new_hi, 0)
    for j0 in range(0, new_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < new_hi
        visible = row_ok[:, None] & j_ok[None, :] & (offs_j[None, :] <= tok[:, None])
        if HAS_MASK:
            words = tl.load(
                mask_ptr + row_t[:, None] * stride_mask + (offs_j // 32)[None, :],
                mask=visible,
                other=0,
            )
            visible = visible & (((words >> (offs_j % 32)[None, :]) & 1) != 0)
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr,
            bt_row,
            kvh,
            prefix_len + offs_j,
            j_ok,
            visible,
            offs_d,
            d_ok,
            block_size,
            qk_scale,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_vd,
            UPCAST,
            DOT_PRECISION,
        )

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    st_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr
            + row_t[:, None] * stride_ot
            + qh[:, None] * stride_oh
            + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=st_mask,
        )
    else:
        lse = tl.where(has, m_i + tl.log2(l_safe), -1.0e30)  # empty split -> weight 0
        tl.store(
            part_o_ptr
            + row_t[:, None] * stride_pot
            + qh[:, None] * stride_poh
            + pid_s * stride_pos
            + offs_d[None, :],
            o,
            mask=st_mask,
        )
        tl.store(part_lse_ptr + row_t * stride_plt + qh * stride_plh + pid_s, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    stride_pot,
    stride_poh,
    stride_pos,
    stride_plt,
    stride_plh,
    stride_ot,
    stride_oh,
    stride_od,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program per (row, query head): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + t * stride_plt + h * stride_plh + offs_s, mask=s_ok, other=-1.0e30)
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(s_ok, w, 0.0)
    o = tl.load(
        part_o_ptr
        + t * stride_pot
        + h * stride_poh
        + offs_s[:, None] * stride_pos
        + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(
        out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


# --------------------------------------------------------------------------------------------
# launcher


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_config(
    *,
    group: int,
    head_dim: int,
    max_q_len: int,
    dtype: torch.dtype,
    on_gpu: bool,
    block_n: int | None = None,
) -> dict[str, int | str]:
    """Block sizes for one launch (no autotune: it needs a CUDA driver, see KERNEL-NOTES).

    BLOCK_M = BLOCK_Q * GROUP_PAD >= 16 (tl.dot minimum). Decode (q_len 1) pads to 16 rows: the
    kernel is bandwidth-bound there, so the idle MMA rows cost nothing measurable. Trees and
    prefill chunks fill up to 64 rows (128 would need 2x the fp32 accumulator registers at
    D = 128). BLOCK_N = 64 keeps the K and V tiles at 16 KiB each in fp16 at D = 128.
    """
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # fp32 (ieee) dots lower to FMA loops: at BLOCK_M 64 / BLOCK_N 64 / D 128 the sm_90 compile
    # took 57 s and 128 KiB of shared memory (measured, compile gate); 16 x 32 tiles keep it small.
    fp32 = dtype == torch.float32
    max_m = 16 if fp32 else (64 if block_d <= 128 else 32)
    block_q = min(triton.next_power_of_2(max(1, max_q_len)), max(1, max_m // group_pad))
    block_q = max(block_q, max(1, 16 // group_pad))
    if block_n is None:
        block_n = 32 if fp32 or block_d > 128 else 64
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot minimum), got {block_n}")
    return {
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_Q": block_q,
        "BLOCK_N": block_n,
        # bf16 arithmetic is garbage in the interpreter (stored as uint16): upcast there only.
        "UPCAST": int(dtype == torch.bfloat16 and not on_gpu),
        # fp32 inputs: exact products (tf32 would cost ~1e-3 relative error vs the reference).
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4 if block_q * group_pad <= 64 else 8,
        "num_stages": 2,
    }


def _pick_splits(q: torch.Tensor, programs: int, max_kv: int, block_n: int) -> int:
    if not q.is_cuda:
        return 1  # interpreter: programs run one after another, splitting only adds work
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms:
        return 1
    # at least 4 kv tiles per split so the merge stays a small fraction of the work
    by_len = max(1, max_kv // (4 * block_n))
    return int(max(1, min(16, triton.cdiv(2 * sms, programs), by_len)))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    block_tables: torch.Tensor,
    mask_words: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    max_q_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged prefix + tree/causal attention for one layer. Returns out [T, Hq, D] (q's dtype).

    max_q_len: the longest request's row count; pass it to avoid a device sync (else it is read
    from cu_q). num_splits: split-KV ranges (None = heuristic; 1 off). block_n: kv tile override.
    """
    _check(q.dim() == 3, f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    _check(k_cache.dim() == 4, f"k_cache must be [NB, BS, Hkv, D], got {tuple(k_cache.shape)}")
    _check(
        v_cache.shape == k_cache.shape,
        f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}",
    )
    _check(q.dtype in _SUPPORTED, f"q dtype {q.dtype} not supported; use fp16, bf16 or fp32")
    _check(
        k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
        f"q/k_cache/v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}",
    )
    t_rows, hq, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    _check(dk == d, f"head_dim mismatch: q has {d}, cache has {dk}")
    _check(hq % hkv == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
    _check(
        cu_q.dtype == torch.int32 and cu_q.dim() == 1 and cu_q.numel() >= 2,
        "cu_q must be int32 [R + 1] (prefix sums of per-request query rows)",
    )
    r = cu_q.numel() - 1
    _check(
        prefix_lens.dtype == torch.int32 and tuple(prefix_lens.shape) == (r,),
        f"prefix_lens must be int32 [{r}], got {prefix_lens.dtype} {tuple(prefix_lens.shape)}",
    )
    _check(
        block_tables.dtype == torch.int32
        and block_tables.dim() == 2
        and block_tables.shape[0] == r,
        f"block_tables must be int32 [{r}, max_blocks], got {block_tables.dtype} "
        f"{tuple(block_tables.shape)}",
    )
    _check(block_tables.stride(1) == 1, "block_tables must be contiguous along its last dim")
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("cu_q", cu_q),
        ("prefix_lens", prefix_lens),
        ("block_tables", block_tables),
    ):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    if max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max().item()) if r > 0 else 0
    if mask_words is not None:
        _check(
            mask_words.dtype == torch.int32
            and mask_words.dim() == 2
            and mask_words.shape[0] == t_rows,
            f"mask_words must be int32 [T={t_rows}, ceil(max_q/32)], got "
            f"{mask_words.dtype} {tuple(mask_words.shape)}",
        )
        _check(
            mask_words.shape[1] * 32 >= max_q_len,
            f"mask_words has {mask_words.shape[1]} words per row; {max_q_len} rows need "
            f"{triton.cdiv(max_q_len, 32)}",
        )
        _check(mask_words.stride(1) == 1, "mask_words must be contiguous along its last dim")
        _check(mask_words.device == q.device, "mask_words must be on q's device")
    if out is None:
        out = torch.empty_like(q)
    _check(out.shape == q.shape and out.dtype == q.dtype, "out must match q's shape and dtype")
    if t_rows == 0 or r == 0 or max_q_len == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    cfg = attention_config(
        group=hq // hkv,
        head_dim=d,
        max_q_len=max_q_len,
        dtype=q.dtype,
        on_gpu=q.is_cuda and not _interpreting(),
        block_n=block_n,
    )
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    q_tiles = triton.cdiv(max_q_len, cfg["BLOCK_Q"])
    max_kv_tiles = triton.cdiv(block_tables.shape[1] * bs, cfg["BLOCK_N"])
    if num_splits is None:
        num_splits = _pick_splits(q, q_tiles * r * hkv, block_tables.shape[1] * bs, cfg["BLOCK_N"])
    _check(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    tiles_per_split = triton.cdiv(max(1, max_kv_tiles), num_splits)

    if num_splits > 1:
        part_o = torch.empty(
            t_rows, hq, num_splits, cfg["BLOCK_D"], device=q.device, dtype=torch.float32
        )
        part_lse = torch.empty(t_rows, hq, num_splits, device=q.device, dtype=torch.float32)
    else:  # never dereferenced (NUM_SPLITS == 1 branch is compiled out)
        part_o = torch.empty(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(1, 1, 1, device=q.device, dtype=torch.float32)
    mask_arg = mask_words if mask_words is not None else cu_q  # dummy pointer when causal

    grid = (q_tiles, r * hkv, num_splits)
    _tree_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        cu_q,
        prefix_lens,
        block_tables,
        mask_arg,
        float(scale),
        bs,
        hkv,
        tiles_per_split,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        block_tables.stride(0),
        mask_words.stride(0) if mask_words is not None else 0,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        HAS_MASK=mask_words is not None,
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        **cfg,
    )
    if num_splits > 1:
        _merge_splits_kernel[(t_rows, hq)](
            part_o,
            part_lse,
            out,
            part_o.stride(0),
            part_o.stride(1),
            part_o.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            *out.stride(),
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=d,
            BLOCK_D=cfg["BLOCK_D"],
            num_warps=4,
        )
    return out
