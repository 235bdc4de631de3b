"""Paged attention: the metadata the runner builds, the backend interface, the torch backend.

KV cache layout (one tensor for the whole model, built by the runner):
``kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; layer l's K is
``kv_cache[l, 0]`` and V ``kv_cache[l, 1]``. Token position p of a request lives in slot
``block_ids[p // block_size] * block_size + p % block_size`` of the flattened
``[num_blocks * block_size, num_kv_heads, head_dim]`` view.

Semantics of one step (every backend): first write the K/V of the step's new tokens through
``slot_mapping`` (-1 = skip), then query row i of request b attends to the b's first
``prefix_lens[b]`` cached tokens plus its new tokens j allowed by its mask (causal: j <= i; a
speculative token tree: ancestors and itself).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Where one forward's flattened tokens come from and go to. T tokens, B requests."""

    # int64 [T]: cache slot of each new token; -1 = compute but do not store.
    slot_mapping: torch.Tensor
    # Host-side per-request counts (planning without device syncs).
    query_lens: list[int]
    # Tokens already in the cache before this step, per request.
    prefix_lens: list[int]
    # int32 [B, max_blocks] (padded with 0), on the model's device.
    block_tables: torch.Tensor
    block_size: int
    # Optional bool [q_len, q_len] ancestor masks per request (None entry = causal).
    tree_masks: list[torch.Tensor | None] | None = None
    # Optional, per request: True when its rows are a draft tree (a chain included) to verify,
    # so that every row is one decode at its own position. The torch backend then attends row
    # by row exactly as plain decoding would (see TorchAttentionBackend), which keeps
    # speculative outputs bitwise those of plain decoding.
    verify_rows: list[bool] | None = None
    # Optional, per request: its prompt length. Prompt rows are attended in canonical pieces
    # (one per KV block) and later rows (generated tokens recomputed after a preemption) one
    # by one, as decoding computed them, so a row's result does not depend on how the prompt
    # was cut into chunks (see TorchAttentionBackend). None: every row is a prompt row.
    prompt_lens: list[int] | None = None
    # Host copy of block_tables (planning without device syncs); None = copy on demand.
    block_tables_cpu: torch.Tensor | None = None
    # Filled by AttentionBackend.prepare (once per forward, shared by all layers).
    backend_state: Any = field(default=None, repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def kv_lens(self) -> list[int]:
        """Cached tokens per request after this step's writes."""
        return [p + q for p, q in zip(self.prefix_lens, self.query_lens, strict=True)]

    @property
    def cu_q(self) -> list[int]:
        """Query offsets [B + 1]: request b owns rows cu_q[b]:cu_q[b+1] of the flat batch."""
        out = [0]
        for n in self.query_lens:
            out.append(out[-1] + n)
        return out


def build_attention_metadata(
    query_lens: list[int],
    prefix_lens: list[int],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
    tree_masks: list[torch.Tensor | None] | None = None,
    verify_rows: list[bool] | None = None,
    prompt_lens: list[int] | None = None,
) -> AttentionMetadata:
    """Metadata for requests whose new tokens sit at positions prefix_len + index.

    Token k of request b is stored at cache position prefix_lens[b] + k, including speculative
    tree nodes (rotated by depth, stored by index), so the slot mapping follows from the block
    tables alone.
    """
    slots: list[int] = []
    for q, p, blocks in zip(query_lens, prefix_lens, block_ids, strict=True):
        need = (p + q + block_size - 1) // block_size
        assert len(blocks) >= need, f"request needs {need} blocks, has {len(blocks)}"
        for pos in range(p, p + q):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    width = max((len(b) for b in block_ids), default=1) or 1
    table = torch.zeros(len(block_ids), width, dtype=torch.int32)
    for i, blocks in enumerate(block_ids):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens=list(query_lens),
        prefix_lens=list(prefix_lens),
        block_tables=table.to(device),
        block_size=block_size,
        tree_masks=tree_masks,
        verify_rows=verify_rows,
        prompt_lens=prompt_lens,
        block_tables_cpu=table,
    )


class AttentionBackend(ABC):
    """Computes paged attention for one layer; chosen by name ("torch", "triton", "auto")."""

    name: str = ""

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Precomputes per-step state (masks, gather indices) into meta.backend_state."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D]; caches [num_blocks, block_size, Hk, D] -> [T, Hq, D].

        Writes k/v into the caches through meta.slot_mapping before attending.
        """


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rows: torch.Tensor | None,
) -> None:
    """Stores k/v [T, Hk, D] at slot_mapping; `rows` = the rows to store (None = all)."""
    slots = slot_mapping
    if rows is not None:
        k, v, slots = k[rows], v[rows], slots[rows]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def rows_to_write(meta: AttentionMetadata) -> torch.Tensor | None:
    """The rows whose K/V are stored (slot >= 0), on the slots' device; None = every row."""
    valid = meta.slot_mapping.cpu() >= 0
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1).to(meta.slot_mapping.device)


# Batched mode: requests with at most this many new tokens (decode, short speculative trees)
# are padded into one SDPA call; longer ones (prefill chunks) run alone so a 512-token chunk
# does not pad 63 decode rows to 512 queries each.
_BATCH_MAX_QUERY = 16


@dataclass
class _Group:
    """One SDPA call (Bg requests padded to Mq queries and Mkv keys, or one request), or one
    request's rows in several calls (``segments``)."""

    # Contiguous flat rows when Bg == 1 (no gather needed) ...
    q_slice: slice | None = None
    # ... else [Bg, Mq] rows of the flat batch to gather (padding -> row 0), and where the real
    # rows of the flattened [Bg * Mq] result go back to (out[out_rows] = result[valid_flat]).
    q_index: torch.Tensor | None = None
    valid_flat: torch.Tensor | None = None
    out_rows: torch.Tensor | None = None
    # Keys: [Bg, Mkv] cache slots to gather; or one request's blocks [nblk] and the first kv_len
    # tokens in them (the step's own keys are written to the cache before attending).
    kv_slots: torch.Tensor | None = None
    kv_blocks: torch.Tensor | None = None
    kv_len: int = 0
    # [Bg, 1, Mq, Mkv] bool (None = every key visible).
    mask: torch.Tensor | None = None
    # Rows attended in separate calls (Bg == 1; see TorchAttentionBackend): verify rows and
    # recomputed generated rows one by one, prompt rows in canonical pieces.
    segments: list[_Segment] | None = None


@dataclass
class _Segment:
    """Query rows start:end of one request (relative to its first new row), attending to the
    first ``keys`` of its gathered keys (or those positions, for a tree row) under ``mask``
    ([end - start, keys] bool; None = all of them)."""

    start: int
    end: int
    keys: int | torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class _TorchState:
    groups: list[_Group]
    write_rows: torch.Tensor | None


class TorchAttentionBackend(AttentionBackend):
    """Plain torch: gather K/V from the paged cache, then SDPA per request or per group.

    Two modes. Per request (CPU default): one gather per request and layer, one SDPA call for
    a decode row and one per segment otherwise (verify rows one by one, prompt rows one KV
    block at a time: see ``_attend_segments`` for why); the per-request decode path, measured on
    2 CPU cores with SmolLM2 shapes (9/3 heads, D 64) it beats padding decode rows into one
    masked SDPA call at every batch size tried (decode, ms/layer incl. gathers: B=8 ctx<=500
    2.3 vs 4.1, B=32 ctx<=500 10.5 vs 18.9, B=64 ctx<=1000 47 vs 189, B=32 ctx~1000 47 vs
    60): the padded gathers and masks cost more than the Python loop saves.
    Batched (CUDA default): short requests padded into one call, since there each call costs
    kernel launches rather than memory traffic.
    """

    name = "torch"

    def __init__(self, batch_decode: bool | None = None) -> None:
        # None: decide per step from the device (batched on CUDA, per request on CPU).
        self.batch_decode = batch_decode

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        write_rows = rows_to_write(meta)
        cu = meta.cu_q
        if meta.block_tables_cpu is None:
            meta.block_tables_cpu = meta.block_tables.cpu()
        batched = self.batch_decode if self.batch_decode is not None else device.type == "cuda"
        if batched:
            small = [b for b, n in enumerate(meta.query_lens) if n <= _BATCH_MAX_QUERY]
            large = [b for b, n in enumerate(meta.query_lens) if n > _BATCH_MAX_QUERY]
            groups = [self._single(meta, b, cu, device) for b in large]
            if len(small) == 1:
                groups.append(self._single(meta, small[0], cu, device))
            elif small:
                groups.append(self._group(meta, small, cu, device))
        else:
            groups = [self._single(meta, b, cu, device) for b in range(meta.num_requests)]
        meta.backend_state = _TorchState(groups=groups, write_rows=write_rows)

    def _single(
        self, meta: AttentionMetadata, b: int, cu: list[int], device: torch.device
    ) -> _Group:
        """One request: contiguous query rows, its blocks gathered whole (no padding)."""
        n, p = meta.query_lens[b], meta.prefix_lens[b]
        tree = meta.tree_masks[b] if meta.tree_masks else None
        rows = slice(cu[b], cu[b + 1])
        kv_len = p + n
        prompt_len = meta.prompt_lens[b] if meta.prompt_lens is not None else kv_len
        if n == 1 and tree is None and p >= prompt_len:
            # Plain decode: one query row sees every key; no mask, nothing to split.
            blocks = self._blocks(meta, b, kv_len, device)
            return _Group(q_slice=rows, kv_blocks=blocks, kv_len=kv_len)
        if meta.verify_rows is not None and meta.verify_rows[b]:
            segments = _verify_segments(p, n, tree, device)
        elif tree is None:
            segments = _prompt_segments(p, n, prompt_len, meta.block_size, device)
        else:  # a tree without the verify flag (tests of the masked path)
            full = torch.ones(n, kv_len, dtype=torch.bool)
            full[:, p:] = tree
            segments = [_Segment(0, n, kv_len, full.to(device))]
        return _Group(
            q_slice=rows,
            kv_blocks=self._blocks(meta, b, kv_len, device),
            kv_len=kv_len,
            segments=segments,
        )

    @staticmethod
    def _blocks(meta: AttentionMetadata, b: int, kv_len: int, device: torch.device) -> torch.Tensor:
        assert meta.block_tables_cpu is not None
        nblk = (kv_len + meta.block_size - 1) // meta.block_size
        return meta.block_tables_cpu[b, :nblk].long().to(device)

    def _group(
        self, meta: AttentionMetadata, reqs: list[int], cu: list[int], device: torch.device
    ) -> _Group:
        q_lens = [meta.query_lens[b] for b in reqs]
        p_lens = [meta.prefix_lens[b] for b in reqs]
        trees = [meta.tree_masks[b] if meta.tree_masks else None for b in reqs]
        mq, mkv = max(q_lens), max(p + q for p, q in zip(p_lens, q_lens, strict=True))
        bsz = meta.block_size
        # Gather indices: key position j of request b -> its cache slot.
        pos = torch.arange(mkv)
        tables = meta.block_tables.cpu().long()[reqs]  # [Bg, max_blocks]
        blk = pos // bsz
        blk = blk.clamp(max=tables.shape[1] - 1)
        kv_slots = tables[:, blk] * bsz + pos % bsz  # [Bg, Mkv]
        i = torch.arange(mq)[None, :, None]  # query row
        j = pos[None, None, :]  # key position
        p = torch.tensor(p_lens)[:, None, None]
        q = torch.tensor(q_lens)[:, None, None]
        mask = (j < p) | ((j >= p) & (j - p <= i) & (j < p + q))  # [Bg, Mq, Mkv]
        for g, tree in enumerate(trees):
            if tree is not None:
                n = q_lens[g]
                mask[g, :n, p_lens[g] : p_lens[g] + n] = tree.cpu()
        # Padding rows (i >= q_len) must attend somewhere, or SDPA returns NaN; results dropped.
        pad = torch.arange(mq)[None, :] >= q[:, :, 0]  # [Bg, Mq]
        mask[:, :, 0] |= pad
        starts = torch.tensor([cu[b] for b in reqs])[:, None]
        q_index = (starts + torch.arange(mq)[None, :]).masked_fill(pad, 0)
        valid_flat = (~pad).flatten().nonzero().squeeze(1)
        return _Group(
            q_index=q_index.to(device),
            valid_flat=valid_flat.to(device),
            out_rows=q_index.flatten()[valid_flat].to(device),
            kv_slots=kv_slots.to(device),
            mask=mask[:, None].to(device),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.backend_state is None:
            self.prepare(meta)
        state: _TorchState = meta.backend_state
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, state.write_rows)
        if len(state.groups) == 1 and state.groups[0].q_slice is not None:
            g = state.groups[0]
            return self._attend(g, q, k_cache, v_cache, scale)[0].transpose(0, 1)
        out = torch.empty_like(q)
        for g in state.groups:
            o = self._attend(g, q, k_cache, v_cache, scale)  # [Bg, Hq, Mq, D]
            if g.q_slice is not None:
                out[g.q_slice] = o[0].transpose(0, 1)
            else:
                assert g.out_rows is not None and g.valid_flat is not None
                flat = o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3])  # [Bg*Mq, Hq, D]
                out[g.out_rows] = flat[g.valid_flat]
        return out

    @staticmethod
    def _attend(
        g: _Group,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """-> [Bg, Hq, Mq, D]."""
        if g.q_slice is not None:
            qg = q[g.q_slice].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        else:
            qg = q[g.q_index].transpose(1, 2)  # [Bg, Hq, Mq, D]
        if g.segments is not None:
            return _attend_segments(g, qg, k_cache, v_cache, scale)
        if g.kv_blocks is not None:
            # [nblk, block_size, Hk, D] -> [1, Hk, kv_len, D]: whole blocks copy faster than
            # per-slot indices.
            kg = k_cache[g.kv_blocks].flatten(0, 1)[: g.kv_len].transpose(0, 1)[None]
            vg = v_cache[g.kv_blocks].flatten(0, 1)[: g.kv_len].transpose(0, 1)[None]
        else:
            assert g.kv_slots is not None
            kg = k_cache.view(-1, *k_cache.shape[2:])[g.kv_slots].transpose(1, 2)
            vg = v_cache.view(-1, *v_cache.shape[2:])[g.kv_slots].transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            qg,
            kg,
            vg,
            attn_mask=g.mask,
            scale=scale,
            enable_gqa=qg.shape[1] != kg.shape[1],
        )


def _verify_segments(
    prefix_len: int, n: int, tree: torch.Tensor | None, device: torch.device
) -> list[_Segment]:
    """Verify rows one by one, each with the keys plain decoding of its token would attend:
    the prefix and the row's ancestors-or-self, in path order (their slots hold them by node
    index)."""
    if tree is None:  # a chain: row i sees the first prefix_len + i + 1 keys
        return [_Segment(i, i + 1, prefix_len + i + 1) for i in range(n)]
    prefix = torch.arange(prefix_len)
    ancestry = [prefix_len + tree[i].cpu().nonzero().squeeze(1) for i in range(n)]
    return [_Segment(i, i + 1, torch.cat([prefix, a]).to(device)) for i, a in enumerate(ancestry)]


def _prompt_segments(
    prefix_len: int, n: int, prompt_len: int, piece: int, device: torch.device
) -> list[_Segment]:
    """Rows prefix_len .. prefix_len + n - 1 of one request, cut so that every row is computed
    the same way whatever chunk it came in.

    Prompt rows go in pieces of ``piece`` positions (the KV block size) aligned at multiples
    of it; every row of a piece sees the same number of keys, up to the piece's end (or the
    prompt's), under a causal mask. Rows past the prompt (generated tokens recomputed after a
    preemption) go one by one, exactly as decoding computed them. The scheduler cuts prompts
    only at piece boundaries, so a piece is never split across steps; if it had to (a token
    budget below one block), the piece ends where the chunk does.
    """
    end = prefix_len + n
    segments = []
    start = prefix_len
    while start < min(end, prompt_len):
        stop = min((start // piece + 1) * piece, prompt_len, end)
        rows = torch.arange(start, stop)[:, None]
        mask = torch.arange(stop)[None, :] <= rows
        segments.append(_Segment(start - prefix_len, stop - prefix_len, stop, mask.to(device)))
        start = stop
    segments += [_Segment(r - prefix_len, r - prefix_len + 1, r + 1) for r in range(start, end)]
    return segments


def _attend_segments(
    g: _Group, qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each segment in its own call, over only the keys it may see.

    Why: on CPU, SDPA's result for a row depends on how many keys the call holds (masked ones
    included) and on the mask path, though not on how many query rows it holds (checked on
    torch 2.13). So a row of a masked k-row verify call differs from the one-row decode in the
    last bits, and so does a prompt row attended with its whole prompt from one attended with
    the chunk it was scheduled in. In float32 that almost never moves a greedy token; with
    int4 weights the next linear rounds its input to bfloat16, which turns last-bit
    differences into visible ones: speculative outputs drifted from plain decoding's at
    near-ties (19 of 32 speculative configurations in
    loadtest/results/spec/2026-12-03-drafters-before-verify-fix.md), and so did plain
    decoding with the prompts cut elsewhere (1 of 32 repetitive prompts at batch 32, when
    draft tokens took part of the token budget). With every row attended the same way in
    every schedule, and the int4 linears row-independent, a request's tokens do not depend on
    what it was batched with, speculation included.
    """
    assert g.kv_blocks is not None and g.segments is not None
    k_all = k_cache[g.kv_blocks].flatten(0, 1)[: g.kv_len]  # [kv_len, Hk, D]
    v_all = v_cache[g.kv_blocks].flatten(0, 1)[: g.kv_len]
    out = []
    for seg in g.segments:
        if isinstance(seg.keys, int):
            kg, vg = k_all[: seg.keys], v_all[: seg.keys]
        else:
            kg, vg = k_all[seg.keys], v_all[seg.keys]
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                qg[:, :, seg.start : seg.end],
                kg.transpose(0, 1)[None],
                vg.transpose(0, 1)[None],
                attn_mask=None if seg.mask is None else seg.mask[None, None],
                scale=scale,
                enable_gqa=qg.shape[1] != kg.shape[1],
            )
        )
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)
