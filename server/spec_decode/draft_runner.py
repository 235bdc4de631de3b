"""A draft model's forward passes over the target's paged block tables, and its KV bookkeeping.

The draft model keeps its own K/V in its own paged cache tensor, shaped for the draft
(``[L_d, 2, num_blocks, block_size, Hk_d, D_d]``) but indexed by the SAME block ids as the
target: a request's ``block_ids`` (owned by the Request, filled by the scheduler's block
manager) already cover every position a step touches, the draft slots
``prefix + 1 .. prefix + k`` included, so the draft needs no block manager of its own.

Bookkeeping, per request: ``tokens`` = the token ids whose draft K/V sit at positions
``0 .. len(tokens) - 1`` of the request's blocks. At propose time the valid prefix is the
longest common prefix of ``tokens`` and ``all_token_ids[: num_computed_tokens + 1]``, capped at
``num_computed_tokens`` (the root's logits are always recomputed: they give the first draft).
Why that is enough:

- K/V at position p depends only on tokens 0..p, so a matching prefix means matching K/V.
- Drafts the target rejected differ from the token now at their position: the lcp stops there
  and the next catch-up overwrites them. Accepted drafts need no recompute.
- Positions below ``num_tokens`` stay in blocks the request holds (the scheduler only trims
  blocks past ``num_tokens``), except after preemption, which frees every block: the core calls
  ``reset`` then, and ``Request.num_preemptions`` is checked as well, so a late or missed call
  cannot let stale K/V through.
- Prefix-cache-shared blocks are rewritten with the same tokens at the same positions, i.e. the
  same draft K/V, so sharing them is harmless.

A draft that IS the target (the synthetic drafter) may share the target's cache instead
(``shares_target_cache``): slots below ``num_computed_tokens`` then already hold exactly the
K/V the draft would compute, and the verify forward rewrites every slot from the root on
before reading it, so the draft's writes there are harmless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server.engine.request import Request
from server.model.attention import build_attention_metadata
from server.model.llama import CausalLM


@dataclass
class _DraftState:
    # Token ids whose draft K/V are at positions 0 .. len - 1 of the request's blocks.
    tokens: list[int] = field(default_factory=list)
    # Request.num_preemptions when ``tokens`` was last valid: a change means the blocks are gone.
    num_preemptions: int = 0


@dataclass
class DraftChunk:
    """One request's tokens for a draft forward: ``token_ids`` at positions
    ``start .. start + len(token_ids) - 1``; K/V before ``start`` must already be cached."""

    request: Request
    token_ids: list[int]
    start: int


class DraftRunner:
    """Runs the draft model over requests' block tables and tracks which K/V it holds."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        target_vocab_size: int,
        kv_cache: torch.Tensor | None = None,
    ) -> None:
        """kv_cache: the target's own cache when the draft is the target model (shared, see the
        module docstring); None = allocate one for the draft."""
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.target_vocab_size = target_vocab_size
        self.shares_target_cache = kv_cache is not None
        s = model.spec
        if kv_cache is None:
            # [L_d, 2, num_blocks, block_size, Hk_d, D_d]: the target's block ids index it.
            kv_cache = torch.zeros(
                s.num_layers,
                2,
                num_blocks,
                block_size,
                s.num_kv_heads,
                s.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        assert kv_cache.shape[2:4] == (num_blocks, block_size), kv_cache.shape
        self.kv_cache = kv_cache
        self._states: dict[str, _DraftState] = {}

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
        s = model.spec
        elem = next(model.parameters()).element_size()
        return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * elem

    # ---- bookkeeping --------------------------------------------------------------------

    def catch_up_chunk(self, request: Request) -> DraftChunk:
        """The tokens the draft must compute so that its K/V cover the request's known tokens
        up to and including the root ``all_token_ids[num_computed_tokens]`` (>= 1 token: the
        root's logits are always needed)."""
        root_pos = request.num_computed_tokens
        assert root_pos < request.num_tokens, "a drafting request has its root token known"
        known = request.all_token_ids[: root_pos + 1]
        if self.shares_target_cache:
            valid = root_pos  # the target cache holds every computed position
        else:
            state = self._state(request)
            valid = min(_common_prefix_len(state.tokens, known), root_pos)
            del state.tokens[valid:]
        return DraftChunk(request, known[valid:], valid)

    def record(self, chunk: DraftChunk) -> None:
        """Notes that ``chunk``'s K/V are now in the draft cache (call after the forward)."""
        if self.shares_target_cache:
            return
        state = self._state(chunk.request)
        assert len(state.tokens) == chunk.start, (len(state.tokens), chunk.start)
        state.tokens.extend(chunk.token_ids)

    def reset(self, request_ids: set[str] | list[str]) -> None:
        """The requests' K/V are gone (preempted): recompute from scratch next time."""
        for rid in request_ids:
            state = self._states.get(rid)
            if state is not None:
                state.tokens.clear()

    def release(self, request_ids: set[str] | list[str]) -> None:
        for rid in request_ids:
            self._states.pop(rid, None)

    def num_valid_tokens(self, request_id: str) -> int:
        """Positions whose draft K/V this runner holds for the request (tests, debugging)."""
        state = self._states.get(request_id)
        return len(state.tokens) if state is not None else 0

    def _state(self, request: Request) -> _DraftState:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _DraftState()
        if state.num_preemptions != request.num_preemptions:
            # Preempted since: its blocks were freed (and maybe reused by others).
            state.tokens.clear()
            state.num_preemptions = request.num_preemptions
        return state

    # ---- forward ------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, chunks: list[DraftChunk]) -> torch.Tensor:
        """One batched draft forward over ``chunks``; writes their K/V into the draft cache and
        returns float32 logits [B, V_target] of each chunk's LAST token, in chunk order.

        The draft's vocabulary rows are cut or padded (-inf) to the target's size: both share a
        tokenizer, but checkpoints pad their embedding matrices differently.
        """
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        prefix_lens: list[int] = []
        block_ids: list[list[int]] = []
        for c in chunks:
            assert c.token_ids, "every chunk computes at least one token"
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.start + len(c.token_ids)))
            query_lens.append(len(c.token_ids))
            prefix_lens.append(c.start)
            block_ids.append(c.request.block_ids)
        attn = build_attention_metadata(
            query_lens, prefix_lens, block_ids, self.block_size, self.device
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, pos, attn, self.kv_cache)  # [T, H]
        last = torch.tensor(attn.cu_q[1:], device=self.device) - 1  # [B]
        logits = self.model.compute_logits(hidden[last])  # [B, V_draft] float32
        for c in chunks:
            self.record(c)
        return self._to_target_vocab(logits)

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V_draft] -> [B, V_target]."""
        v_draft, v_target = logits.shape[1], self.target_vocab_size
        if v_draft == v_target:
            return logits
        if v_draft > v_target:
            return logits[:, :v_target].contiguous()
        pad = logits.new_full((logits.shape[0], v_target - v_draft), -math.inf)
        return torch.cat([logits, pad], dim=1)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Usually all but the last one or two tokens match: compare in slices, not one by one.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i
