"""ModelRunner: owns the model, the paged KV cache and per-request RNGs; executes StepPlans.

It follows server/engine/plan.py exactly: per scheduled request it computes the tokens
``all_token_ids[num_computed_tokens : num_computed_tokens + n]``, writes their K/V into the
request's blocks, samples one token for requests whose scheduled tokens reach their last known
token, and returns prompt logprobs for requests that asked for them. It never decides
admission: the block tables it gets are trusted to be large enough.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from server.config import EngineConfig
from server.engine.faults import FaultInjector
from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request
from server.model.attention import AttentionMetadata, build_attention_metadata
from server.model.attention_backends import get_attention_backend
from server.model.cpu_linear import plan_linears
from server.model.cpu_threads import apply_cpu_threads, apply_kernel_threads
from server.model.int4 import plan_int4_linears
from server.model.loader import eos_token_ids, load_model, resolve_device, resolve_model
from server.model.sampler import compute_logprobs, sample
from server.model.spec_step import (
    compact_kv,
    compaction_slots,
    path_logprobs,
    top_tokens,
    tree_positions,
    verify_tree,
)

logger = logging.getLogger(__name__)

# KV cache bytes when the config gives neither num_blocks nor kv_cache_memory. CPU: 1 GiB
# (SmolLM2-135M in fp32 holds ~23k tokens in it, far more than 2 cores can serve). CUDA: this
# fraction of the memory still free after loading the weights (activations need the rest).
_CPU_DEFAULT_KV_BYTES = 1 << 30
_CUDA_FREE_FRACTION = 0.8


@dataclass
class _Batch:
    """The flattened inputs of one forward, T tokens over B requests."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attn: AttentionMetadata
    # Rows of the hidden states whose logits are needed, and what each row is for.
    logit_rows: list[int]
    # Per sampling request: index into logit_rows of its last row.
    sample_requests: list[Request]
    sample_rows: list[int]
    # (request, indices into logit_rows, target prompt token ids) for prompt logprobs.
    prompt_rows: list[tuple[Request, list[int], list[int]]]
    # Requests verifying a draft tree, and the index into logit_rows of each one's root row
    # (its n + 1 node rows follow in node order).
    spec_requests: list[Request]
    spec_rows: list[int]


class ModelRunner:
    def __init__(self, engine_config: EngineConfig, draft_kv_bytes_per_block: int = 0) -> None:
        """draft_kv_bytes_per_block: a draft model's cache indexed by the same block ids (see
        server/spec_decode/draft_runner.py) shares the KV memory budget, so each block costs
        both."""
        mc = engine_config.model
        self.config = engine_config
        self.draft_kv_bytes_per_block = draft_kv_bytes_per_block
        self.device = resolve_device(mc.device)
        if self.device.type == "cpu":
            apply_cpu_threads(mc.cpu_threads)
            apply_kernel_threads(mc.kernel_threads)
        self.model_path = resolve_model(mc.model)
        backend = get_attention_backend(engine_config.attention_backend, self.device)
        self.model, self.hf_config, self.tokenizer = load_model(
            self.model_path, mc.dtype, str(self.device), backend, mc.quantization, mc.int4_kernel
        )
        self.dtype = next(self.model.parameters()).dtype
        if self.device.type == "cpu" and mc.cpu_linear_plan:
            plan_linears(self.model)
            plan_int4_linears(self.model)
        spec = self.model.spec
        self.vocab_size: int = spec.vocab_size
        self.block_size: int = engine_config.cache.block_size
        self.max_model_len = self._max_model_len(mc.max_model_len)
        self.eos_token_ids = eos_token_ids(self.model_path, self.hf_config, self.tokenizer)
        self.num_blocks = self._num_blocks()
        # [num_layers, 2 (K, V), num_blocks, block_size, Hk, D]
        self.kv_cache = torch.zeros(
            spec.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            spec.num_kv_heads,
            spec.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self._generators: dict[str, torch.Generator] = {}
        self.faults = FaultInjector.from_env()
        # Top-k guesses per computed row handed to a drafter that recycles them (0 = none);
        # the engine core sets it from the drafter.
        self.feedback_top_k = 0
        logger.info(
            "model %s on %s/%s: %d KV blocks x %d tokens, max_model_len %d, backend %s",
            mc.model,
            self.device,
            self.dtype,
            self.num_blocks,
            self.block_size,
            self.max_model_len,
            backend.name,
        )

    # ---- set-up -------------------------------------------------------------------------

    def _max_model_len(self, requested: int | None) -> int:
        """config's max_model_len, else the model's; capped by a sliding window (see spec)."""
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        window = self.model.spec.sliding_window
        if window is not None and (limit is None or window < limit):
            if requested is None:
                logger.warning(
                    "the model uses sliding-window attention (%d tokens), which specd does "
                    "not implement; capping max_model_len at %d",
                    window,
                    window,
                )
            limit = window
        if requested is None:
            if limit is None:
                raise ValueError(
                    "the model config has no max_position_embeddings; set --max-model-len"
                )
            return int(limit)
        if limit is not None and requested > limit:
            raise ValueError(
                f"--max-model-len {requested} exceeds the model's limit {limit} "
                "(max_position_embeddings or sliding window); use at most that"
            )
        return requested

    def kv_bytes_per_block(self) -> int:
        s = self.model.spec
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * elem

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _CUDA_FREE_FRACTION)
            else:
                budget = _CPU_DEFAULT_KV_BYTES
        per_block = self.kv_bytes_per_block() + self.draft_kv_bytes_per_block
        blocks = budget // per_block
        if blocks < 2:
            raise ValueError(
                f"kv_cache_memory {budget} bytes holds {blocks} blocks "
                f"({per_block} bytes each, draft model's K/V included); raise --kv-cache-memory"
            )
        return int(blocks)

    # ---- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> RunnerOutput:
        """Runs one StepPlan; see the module docstring and server/engine/plan.py."""
        t0 = time.perf_counter()
        for rid in plan.finished_request_ids:
            self._generators.pop(rid, None)
        out = RunnerOutput()
        if plan.is_empty:
            return out
        batch = self._prepare(plan)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_cache)
        if batch.logit_rows:
            rows = torch.tensor(batch.logit_rows, device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [N, V] float32
            self._drop_non_finite(plan, logits, batch, out)
            if batch.sample_requests:
                self._sample(logits, batch, out)
            for r, idx, targets in batch.prompt_rows:
                num_top = r.sampling_params.prompt_logprobs or 0
                out.prompt_logprobs[r.request_id] = compute_logprobs(
                    logits[torch.tensor(idx, device=self.device)], targets, num_top
                )
            if batch.spec_rows:
                self._verify(plan, logits, batch, out)
            if self.feedback_top_k and (batch.sample_rows or batch.spec_rows):
                out.top_tokens = top_tokens(
                    logits,
                    plan,
                    list(zip(batch.sample_requests, batch.sample_rows, strict=True)),
                    list(zip(batch.spec_requests, batch.spec_rows, strict=True)),
                    self.feedback_top_k,
                )
        out.execute_time = time.perf_counter() - t0
        return out

    def _drop_non_finite(
        self, plan: StepPlan, logits: torch.Tensor, batch: _Batch, out: RunnerOutput
    ) -> None:
        """Takes every request with a NaN or infinite logit out of ``batch`` and into
        ``out.failed``: sampling or verifying it would raise (and fail the whole step) or
        emit garbage; the rest of the batch goes on. One reduction and one sync per step; the
        per-request bookkeeping only when some row is bad."""
        if self.faults is not None:
            self.faults.poison_logits(logits, _rows_by_request(plan, batch), plan.requests)
        # A row's sum is finite whenever all its logits are (NaN and inf propagate), and a
        # sum costs a fifth of isfinite over [N, V] on a CPU; a sum that overflowed with
        # finite logits only sends the step to the exact check below.
        if bool(torch.isfinite(logits.sum(dim=-1)).all()):
            return
        finite_rows = torch.isfinite(logits).all(dim=-1)
        if bool(finite_rows.all()):
            return
        rows = _rows_by_request(plan, batch)
        finite = finite_rows.tolist()
        bad = {rid for rid, idx in rows.items() if not all(finite[i] for i in idx)}
        if not bad:
            return
        for rid in bad:
            out.failed[rid] = "the model produced NaN or infinite logits for this request"
        logger.error("non-finite logits: failing %s alone", sorted(bad))
        keep = [i for i, r in enumerate(batch.sample_requests) if r.request_id not in bad]
        batch.sample_requests = [batch.sample_requests[i] for i in keep]
        batch.sample_rows = [batch.sample_rows[i] for i in keep]
        batch.prompt_rows = [p for p in batch.prompt_rows if p[0].request_id not in bad]
        keep = [i for i, r in enumerate(batch.spec_requests) if r.request_id not in bad]
        batch.spec_requests = [batch.spec_requests[i] for i in keep]
        batch.spec_rows = [batch.spec_rows[i] for i in keep]

    def _sample(self, logits: torch.Tensor, batch: _Batch, out: RunnerOutput) -> None:
        reqs = batch.sample_requests
        idx = torch.tensor(batch.sample_rows, device=self.device)
        result = sample(logits[idx], reqs, [self._generator(r) for r in reqs])
        for r, token, lp in zip(reqs, result.token_ids, result.logprobs, strict=True):
            out.sampled_token_ids[r.request_id] = [token]
            if lp is not None:
                out.logprobs[r.request_id] = [lp]

    def _verify(
        self, plan: StepPlan, logits: torch.Tensor, batch: _Batch, out: RunnerOutput
    ) -> None:
        """Verifies every draft tree, then moves accepted K/V to consecutive slots."""
        src: list[int] = []
        dst: list[int] = []
        for r, first_row in zip(batch.spec_requests, batch.spec_rows, strict=True):
            tree = plan.spec_trees[r.request_id]
            rows = logits[first_row : first_row + len(tree.token_ids)]  # [n+1, V]
            result = verify_tree(
                rows,
                r,
                tree,
                self._generator(r),
                plan.spec_draft_kind,
                draft_probs=plan.spec_draft_probs.get(r.request_id),
            )
            out.sampled_token_ids[r.request_id] = result.tokens
            out.spec_accepted_nodes[r.request_id] = list(result.accepted_nodes)
            num_top = r.sampling_params.logprobs
            if num_top is not None:
                out.logprobs[r.request_id] = path_logprobs(rows, result, num_top)
            s, d = compaction_slots(
                r.block_ids, self.block_size, r.num_computed_tokens, result.accepted_nodes
            )
            src += s
            dst += d
        compact_kv(self.kv_cache, src, dst)

    def _generator(self, r: Request) -> torch.Generator | None:
        """The request's own generator when it has a seed (created on first use), else None:
        unseeded requests share the device's default generator (see sampler.py)."""
        seed = r.sampling_params.seed
        if seed is None or r.sampling_params.greedy:
            return None
        g = self._generators.get(r.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[r.request_id] = g
        return g

    def _prepare(self, plan: StepPlan) -> _Batch:
        """Flattens the plan's scheduled tokens (and draft trees) into one batch.

        A draft tree's node i is rotated at position prefix_len + depth(i) but stored at cache
        slot prefix_len + i, so the slot mapping follows from the block tables alone.
        """
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        prefix_lens: list[int] = []
        block_ids: list[list[int]] = []
        logit_rows: list[int] = []
        sample_requests: list[Request] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[Request, list[int], list[int]]] = []
        spec_requests: list[Request] = []
        spec_rows: list[int] = []
        masks: list[torch.Tensor | None] = []
        verify_rows: list[bool] = []
        prompt_lens: list[int] = []
        for r in plan.requests:
            n = plan.num_scheduled_tokens[r.request_id]
            start = r.num_computed_tokens
            assert n >= 1 and start + n <= r.num_tokens, (r.request_id, start, n, r.num_tokens)
            row0 = len(ids)
            prompt_lens.append(r.num_prompt_tokens)
            tree = plan.spec_trees.get(r.request_id)
            if tree is not None:
                # A decoding request's one known token is the tree's root; every node's logits
                # are needed to verify it.
                assert n == 1 and tree.token_ids[0] == r.all_token_ids[start]
                ids.extend(tree.token_ids)
                positions.extend(tree_positions(tree, start))
                query_lens.append(len(tree.token_ids))
                prefix_lens.append(start)
                block_ids.append(r.block_ids)
                masks.append(None if tree.is_chain else tree.ancestor_mask().to(self.device))
                verify_rows.append(True)
                spec_requests.append(r)
                spec_rows.append(len(logit_rows))
                logit_rows.extend(range(row0, row0 + len(tree.token_ids)))
                continue
            masks.append(None)
            verify_rows.append(False)
            ids.extend(r.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            prefix_lens.append(start)
            block_ids.append(r.block_ids)
            if r.sampling_params.prompt_logprobs is not None:
                # Row at position p predicts token p + 1; keep those that are prompt tokens.
                last = min(start + n, r.num_prompt_tokens - 1)
                if last > start:
                    idx = list(range(len(logit_rows), len(logit_rows) + last - start))
                    logit_rows.extend(range(row0, row0 + last - start))
                    prompt_rows.append((r, idx, r.all_token_ids[start + 1 : last + 1]))
            if plan.samples(r):
                sample_requests.append(r)
                sample_rows.append(len(logit_rows))
                logit_rows.append(row0 + n - 1)
        # A chain needs no mask: causal attention over its rows is exactly its ancestry.
        tree_masks = masks if any(m is not None for m in masks) else None
        attn = build_attention_metadata(
            query_lens,
            prefix_lens,
            block_ids,
            self.block_size,
            self.device,
            tree_masks,
            verify_rows=verify_rows if any(verify_rows) else None,
            prompt_lens=prompt_lens,
        )
        return _Batch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            attn=attn,
            logit_rows=logit_rows,
            sample_requests=sample_requests,
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
            spec_requests=spec_requests,
            spec_rows=spec_rows,
        )


def _rows_by_request(plan: StepPlan, batch: _Batch) -> dict[str, list[int]]:
    """request_id -> the indices into ``batch.logit_rows`` of its logits this step."""
    rows: dict[str, list[int]] = {}
    for r, i in zip(batch.sample_requests, batch.sample_rows, strict=True):
        rows.setdefault(r.request_id, []).append(i)
    for r, idx, _ in batch.prompt_rows:
        rows.setdefault(r.request_id, []).extend(idx)
    for r, first in zip(batch.spec_requests, batch.spec_rows, strict=True):
        n = len(plan.spec_trees[r.request_id].token_ids)
        rows.setdefault(r.request_id, []).extend(range(first, first + n))
    return rows
