"""The Triton attention backend: kernels.kv_cache.write_kv + kernels.tree_attention per layer.

Selected by ``--attention-backend triton`` (or ``auto`` on CUDA); see get_attention_backend in
attention_backends.py. Semantics are those of every backend (attention.py's module docstring): write
the step's K/V through the slot mapping, then attend to prefix + allowed new tokens.

All per-step inputs of the kernel (cu_q, prefix lengths, block tables, mask words) are built
once in ``prepare`` and shared by every layer; ``forward`` is two launches and no host sync
(max_q_len comes from the host-side query lengths, not from cu_q on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.kv_cache import write_kv
from kernels.tree_attention import tree_attention
from kernels.tree_masks import batch_mask_words
from server.model.attention import AttentionBackend, AttentionMetadata


@dataclass
class _TritonState:
    """Kernel inputs of one step, on the model's device. T rows, B requests."""

    cu_q: torch.Tensor  # int32 [B + 1]
    prefix_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks], contiguous
    # int32 [T, W] ancestor words for every row (causal rows for non-tree requests) when any
    # request of the step has a tree; None = causal everywhere (the kernel skips mask loads).
    mask_words: torch.Tensor | None
    max_q_len: int


class TritonAttentionBackend(AttentionBackend):
    """Paged tree attention with the Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)."""

    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        b = meta.num_requests
        # cu_q and prefix_lens travel in one host -> device copy.
        host = torch.tensor(meta.cu_q + meta.prefix_lens, dtype=torch.int32)
        dev = host.to(device)
        block_tables = meta.block_tables
        assert block_tables.dtype == torch.int32 and block_tables.shape[0] == b, (
            block_tables.dtype,
            tuple(block_tables.shape),
            b,
        )
        mask_words = None
        trees = meta.tree_masks
        if trees is not None and any(t is not None for t in trees):
            # A mask covers every row of the launch, so non-tree requests get causal words.
            mask_words = batch_mask_words(meta.query_lens, trees).to(device)
        meta.backend_state = _TritonState(
            cu_q=dev[: b + 1],
            prefix_lens=dev[b + 1 :],
            block_tables=block_tables.contiguous(),
            mask_words=mask_words,
            max_q_len=max(meta.query_lens, default=0),
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
        if not isinstance(meta.backend_state, _TritonState):
            self.prepare(meta)
        state: _TritonState = meta.backend_state
        # Write first, then attend: the kernel reads this step's K/V from the cache.
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return tree_attention(
            q,
            k_cache,
            v_cache,
            state.cu_q,
            state.prefix_lens,
            state.block_tables,
            state.mask_words,
            scale=scale,
            max_q_len=state.max_q_len,
        )
