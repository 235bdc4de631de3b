"""The CPU attention backend: decode and verify rows through specd's paged-attention kernel.

kernels/cpu/paged_attention.cpp computes every decode row, verify row (chain or tree) and
generated row recomputed after a preemption of a step in one call per layer, each over exactly
the keys plain decoding gives it, read where they lie in the paged cache. The torch backend
(server/model/attention.py) gathers each request's blocks into a copy and calls SDPA per
request and per verify row, because SDPA's result for a row depends on how many keys the call
holds; on SmolLM2-135M at 256 cached tokens that was ~10 ms of a ~45 ms decode step, and a
5-row verify step made 150 SDPA calls. The kernel's rows depend only on their own query and
keys, so a verify row equals the decode row it stands for bit for bit, as before.

Prompt rows still go through the torch backend's canonical pieces (one SDPA call per KV block:
batch-invariant prefill). Where the kernel can't be built (no AVX2/FMA, compiler or ninja) or
the model is not float32, this backend is the torch one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from server.model import int4_avx2
from server.model.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    _Group,
    _prompt_segments,
    _TorchState,
    rows_to_write,
    write_kv,
)

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "cpu" / "paged_attention.cpp"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel, or None where it can't be had (logged once). It runs on the int4
    extension's threads (--kernel-threads), one set of workers for every kernel of a step."""
    kernel = int4_avx2.load_extension(
        "specd_paged_attention", SOURCE, "attention kernel", "torch's SDPA"
    )
    threads = int4_avx2.load()
    if kernel is not None and threads is not None:
        kernel.use_pool(threads.pool_handle())
    return kernel


@dataclass
class _KernelState:
    """One step's rows for the kernel, and the torch backend's groups for the prompt rows."""

    # Flat rows the kernel computes (None: every row of the step, in order).
    rows: torch.Tensor | None
    # Keys of kernel row i: key_slots[row_starts[i]:row_starts[i + 1]] (flattened cache slots).
    key_slots: torch.Tensor
    row_starts: torch.Tensor
    prompts: _TorchState


class CpuAttentionBackend(TorchAttentionBackend):
    """See the module docstring."""

    name = "cpu"

    def __init__(self, kernel: ModuleType) -> None:
        super().__init__(batch_decode=False)
        self.kernel: ModuleType | None = kernel

    def prepare(self, meta: AttentionMetadata) -> None:
        if self.kernel is None:
            super().prepare(meta)
            return
        if meta.block_tables_cpu is None:
            meta.block_tables_cpu = meta.block_tables.cpu()
        write_rows = rows_to_write(meta)
        cu = meta.cu_q
        rows: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        counts: list[int] = []
        groups: list[_Group] = []
        for b in range(meta.num_requests):
            n, p = meta.query_lens[b], meta.prefix_lens[b]
            tree = meta.tree_masks[b] if meta.tree_masks else None
            verify = bool(meta.verify_rows and meta.verify_rows[b])
            if tree is not None and not verify:  # a tree without the verify flag (tests)
                groups.append(self._single(meta, b, cu, torch.device("cpu")))
                continue
            prompt_len = meta.prompt_lens[b] if meta.prompt_lens is not None else p + n
            prompt_rows = 0 if verify else min(max(prompt_len - p, 0), n)
            if prompt_rows:
                groups.append(self._prompt_group(meta, b, cu[b], p, prompt_rows, prompt_len))
            if prompt_rows == n:
                continue
            slots = self._slots(meta, b, p + n)
            for i in range(prompt_rows, n):
                if tree is None:  # a decode row at position p + i: keys 0 .. p + i
                    row_keys = slots[: p + i + 1]
                else:  # the prefix, then the row's ancestors-or-self in path order
                    ancestry = p + tree[i].cpu().nonzero().squeeze(1)
                    row_keys = torch.cat([slots[:p], slots[ancestry]])
                keys.append(row_keys)
                counts.append(row_keys.numel())
            rows.append(torch.arange(cu[b] + prompt_rows, cu[b] + n))
        starts = torch.zeros(len(counts) + 1, dtype=torch.int64)
        if counts:
            starts[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        flat_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        every_row = not groups and flat_rows.numel() == cu[-1]
        meta.backend_state = _KernelState(
            rows=None if every_row else flat_rows,
            key_slots=torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64),
            row_starts=starts,
            prompts=_TorchState(groups=groups, write_rows=write_rows),
        )

    @staticmethod
    def _slots(meta: AttentionMetadata, b: int, length: int) -> torch.Tensor:
        """Flattened cache slots of request b's positions 0 .. length - 1."""
        assert meta.block_tables_cpu is not None
        bs = meta.block_size
        pos = torch.arange(length)
        return meta.block_tables_cpu[b, pos // bs].long() * bs + pos % bs

    def _prompt_group(
        self, meta: AttentionMetadata, b: int, first: int, p: int, n: int, prompt_len: int
    ) -> _Group:
        """The torch backend's canonical pieces for request b's n prompt rows."""
        cpu = torch.device("cpu")
        return _Group(
            q_slice=slice(first, first + n),
            kv_blocks=self._blocks(meta, b, p + n, cpu),
            kv_len=p + n,
            segments=_prompt_segments(p, n, prompt_len, meta.block_size, cpu),
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
        state = meta.backend_state
        if not isinstance(state, _KernelState):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        if q.dtype != torch.float32 or self.kernel is None:
            # The kernel is float32 only: a bf16/fp16 model runs the torch backend from now on.
            self.kernel = None
            super().prepare(meta)
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, state.prompts.write_rows)
        if state.rows is None:
            return self.kernel.paged_attention(
                q, k_cache, v_cache, state.key_slots, state.row_starts, scale
            )
        out = torch.empty_like(q)
        if state.rows.numel():
            out[state.rows] = self.kernel.paged_attention(
                q[state.rows], k_cache, v_cache, state.key_slots, state.row_starts, scale
            )
        for g in state.prompts.groups:
            assert g.q_slice is not None
            out[g.q_slice] = self._attend(g, q, k_cache, v_cache, scale)[0].transpose(0, 1)
        return out
