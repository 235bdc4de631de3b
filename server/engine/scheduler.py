"""The scheduler: admission, the per-step token budget, preemption, and consuming results.

No prefill phase, no decode phase: every running request has known tokens and computed
tokens, and each step catches computed up to known under a token budget (vLLM v1's rule).
Running requests go first (in admission order), so decode latency is protected; waiting
requests fill what is left of the budget, their prompts cut into chunks. When blocks run out,
the most recently admitted running request is preempted by recompute: its blocks are freed and
it goes back to the front of the queue (its full blocks usually survive in the prefix cache).

The scheduler never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.config import CacheConfig, SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.outputs import EngineCoreOutput
from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request, RequestStatus
from server.engine.speculation import SpeculationStats

# (decoding request, its cap) -> draft slots to reserve before new prompts are admitted.
DraftReservation = Callable[[Request, int], int]


@dataclass
class SchedulerStats:
    """A snapshot for /metrics and tests, sent with every batch of outputs."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_total: int = 0
    num_blocks_used: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0
    # Speculative decoding, as vLLM's spec_decode counters: verify steps that carried drafts,
    # draft tokens proposed, draft tokens accepted, and accepted tokens by draft position.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    # The speculation policy's numbers (filled in by the engine core when speculating).
    speculation: SpeculationStats | None = None
    timestamp: float = 0.0


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        max_spec_tokens: int = 0,
        draft_reservation: DraftReservation | None = None,
    ) -> None:
        """max_spec_tokens: the most draft tokens one request may verify per step (0 = no
        speculation). The scheduler reserves token budget and KV slots for up to that many
        per decoding request (its cap); the speculation policy then decides how many are used.

        draft_reservation(request, cap): how many of a decoding request's cap to reserve
        before new prompts are admitted; the rest of the cap is given from what the step
        leaves after admission. None reserves the whole cap first. Why: reserving every
        decoding request's cap up front cut prompt chunks short even when the policy then
        verified no drafts at all (32 requests x 8 slots = 256 of a 1024-token step).
        """
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.max_spec_tokens = max_spec_tokens
        self.draft_reservation = draft_reservation
        self.block_manager = BlockManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished / preempted since the last plan, for the runner's per-request state.
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        self._num_preemptions = 0
        self._num_prompt_tokens_computed = 0
        self._num_generated_tokens = 0
        self._num_steps = 0
        self._num_drafts = 0
        self._num_draft_tokens = 0
        self._num_accepted_tokens = 0
        self._accepted_per_position = [0] * max_spec_tokens

    # --- requests in and out -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate id {request.request_id}"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> EngineCoreOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None  # already finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return self._output(request, [], None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- plan --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        num_tokens: dict[str, int] = {}
        spec_budgets: dict[str, int] = {}
        # Decoding requests whose reservation was less than their cap: (request, cap).
        short: list[tuple[Request, int]] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, request.num_computed_tokens, budget, scheduled)
            if n == 0:  # its prompt's next piece does not fit: it waits for the next step
                i += 1
                continue
            # Draft tokens take token budget and KV slots like any other token. Speculation
            # never preempts anyone: short of blocks, the request decodes plainly instead.
            cap = self._speculation_cap(request)
            k = min(self._reservation(request, cap), budget - n)
            if k > 0 and not self.block_manager.allocate_slots(request, n + k):
                k = 0
            while k == 0 and not self.block_manager.allocate_slots(request, n):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append(request)
                num_tokens[request.request_id] = n
                if k > 0:
                    spec_budgets[request.request_id] = k
                if k < cap:
                    short.append((request, cap))
                budget -= n + k
                i += 1

        # New work waits while we are short of blocks: admitting it would only preempt again.
        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            cached = self._lookup_prefix(request) if request.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.block_manager.block_size
            n = request.num_tokens - num_cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = self._chunk(request, num_cached, budget, scheduled)
            if n == 0:
                break
            request.num_computed_tokens = num_cached
            if not self.block_manager.allocate_slots(request, n, cached):
                request.num_computed_tokens = 0
                break
            if request.num_cached_tokens < 0:  # first admission: report it in usage
                request.num_cached_tokens = num_cached
                request.first_scheduled_time = time.monotonic()
                self.block_manager.record_lookup(request.num_tokens, num_cached)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            num_tokens[request.request_id] = n
            budget -= n

        budget = self._top_up_drafts(short, num_tokens, spec_budgets, budget)

        # An empty plan never reaches the runner, so finished ids wait for the next real one.
        finished: set[str] = set()
        preempted_ids: set[str] = set()
        if scheduled:
            finished, self._finished_ids = self._finished_ids, set()
            preempted_ids, self._preempted_ids = self._preempted_ids - finished, set()
        return StepPlan(
            scheduled,
            num_tokens,
            finished,
            preempted_ids,
            spec_budgets=spec_budgets,
            num_waiting=len(self.waiting),
        )

    def _chunk(self, request: Request, start: int, budget: int, scheduled: list[Request]) -> int:
        """How many of the request's tokens from ``start`` to compute within ``budget``.

        A prompt is cut only at multiples of the block size (or at its end), so each of its
        blocks is computed in one step and attended the same way whatever the schedule
        (server/model/attention.py, ``_prompt_segments``): plain and speculative decoding,
        and any batch, then give a request the same tokens. Past the prompt any cut will do.
        A step with nothing else to do takes an unaligned cut rather than none (a token
        budget below one block), giving up that guarantee rather than progress.
        """
        remaining = request.num_tokens - start
        n = min(remaining, budget)
        if n == remaining or start + n >= request.num_prompt_tokens:
            return n
        block = self.block_manager.block_size
        aligned = (start + n) // block * block - start
        if aligned > 0:
            return aligned
        return n if not scheduled else 0

    def _reservation(self, request: Request, cap: int) -> int:
        if cap == 0 or self.draft_reservation is None:
            return cap
        return max(0, min(self.draft_reservation(request, cap), cap))

    def _top_up_drafts(
        self,
        short: list[tuple[Request, int]],
        num_tokens: dict[str, int],
        spec_budgets: dict[str, int],
        budget: int,
    ) -> int:
        """Grows each short reservation towards its cap from the budget admission left
        (in running order, never preempting); returns the budget still left."""
        for request, cap in short:
            if budget <= 0:
                break
            rid = request.request_id
            k = spec_budgets.get(rid, 0)
            grown = k + min(cap - k, budget)
            if self.block_manager.allocate_slots(request, num_tokens[rid] + grown):
                spec_budgets[rid] = grown
                budget -= grown - k
        return budget

    def _speculation_cap(self, request: Request) -> int:
        """The most draft tokens this request can use this step (0 = it can't speculate)."""
        if self.max_spec_tokens == 0 or request.num_tokens - request.num_computed_tokens != 1:
            return 0  # still prefilling: nothing to draft from yet
        params = request.sampling_params
        if params.has_penalties:
            # Penalties depend on the tokens before each position, which differ along tree
            # paths; such requests decode without speculation (documented in the README).
            return 0
        cap = self.max_spec_tokens
        if params.max_speculative_tokens is not None:
            cap = min(cap, params.max_speculative_tokens)
        # Accepted drafts + the bonus token must fit in what the request may still output.
        return max(0, min(cap, request.num_tokens_left - 1))

    def _lookup_prefix(self, request: Request) -> list[int]:
        return self.block_manager.find_cached_prefix(request)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        if request.prompt_logprobs is not None:
            request.prompt_logprobs.clear()  # recomputed from scratch on resume
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._preempted_ids.add(request.request_id)
        self.waiting.appendleft(request)

    # --- update ------------------------------------------------------------------------------

    def update(self, plan: StepPlan, output: RunnerOutput) -> list[EngineCoreOutput]:
        """Consumes the runner's results: appends tokens, checks stops, frees finished work."""
        outputs: list[EngineCoreOutput] = []
        self._num_steps += 1
        for request in plan.requests:
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            n = plan.num_scheduled_tokens[request.request_id]
            if request.num_computed_tokens < request.num_prompt_tokens:
                self._num_prompt_tokens_computed += min(
                    n, request.num_prompt_tokens - request.num_computed_tokens
                )
            request.num_computed_tokens += n
            sampled = output.sampled_token_ids.get(request.request_id)
            num_drafts = plan.num_spec_tokens.get(request.request_id, 0)
            if num_drafts and sampled:
                accepted = len(sampled) - 1  # accepted drafts + one bonus/correction token
                self._record_acceptance(request, num_drafts, accepted)
                # The accepted drafts' K/V is in the cache now (compacted by the runner).
                request.num_computed_tokens += accepted
            chunk_logprobs = output.prompt_logprobs.get(request.request_id)
            if chunk_logprobs and request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(chunk_logprobs)
            if not sampled:
                self.block_manager.cache_full_blocks(request)
                continue
            new_tokens, finish = self._append_tokens(request, sampled)
            self._num_generated_tokens += len(new_tokens)
            self.block_manager.cache_full_blocks(request)
            if request.request_id in plan.spec_budgets:
                # Slots reserved for drafts that were not proposed, pruned or rejected: give
                # back whole blocks the request no longer needs.
                self.block_manager.trim(request, request.num_tokens)
            logprobs = output.logprobs.get(request.request_id)
            if logprobs is not None:
                logprobs = logprobs[: len(new_tokens)]
            if finish is not None:
                self.running.remove(request)
                self._finish(request, finish)
            out = self._output(request, new_tokens, logprobs)
            if request.sampling_params.prompt_logprobs is not None and request.prompt_logprobs:
                # The first prompt token has no logprob (nothing predicts it).
                out.prompt_logprobs = [None, *request.prompt_logprobs]
                request.prompt_logprobs = None
            outputs.append(out)
        return outputs

    def _record_acceptance(self, request: Request, num_drafts: int, accepted: int) -> None:
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += accepted
        self._num_drafts += 1
        self._num_draft_tokens += num_drafts
        self._num_accepted_tokens += accepted
        for position in range(accepted):
            self._accepted_per_position[position] += 1

    def _append_tokens(
        self, request: Request, sampled: list[int]
    ) -> tuple[list[int], RequestStatus | None]:
        """Appends sampled tokens up to the first stop condition; returns those kept."""
        params = request.sampling_params
        kept: list[int] = []
        for token in sampled:
            request.append_output_token(token)
            kept.append(token)
            if token in params.stop_token_ids:
                request.stop_reason = token
                return kept, RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in request.eos_token_ids:
                return kept, RequestStatus.FINISHED_STOPPED
            if request.num_output_tokens >= request.max_output_tokens:
                return kept, RequestStatus.FINISHED_LENGTH
        return kept, None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.block_manager.free(request)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]

    def _output(
        self, request: Request, new_tokens: list[int], logprobs: list | None
    ) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            new_logprobs=logprobs,
            finish_reason=request.status.value if request.is_finished else None,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_draft_tokens=request.num_draft_tokens,
            num_accepted_tokens=request.num_accepted_tokens,
            first_scheduled_time=request.first_scheduled_time,
        )

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_used_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            num_preemptions=self._num_preemptions,
            num_prompt_tokens_computed=self._num_prompt_tokens_computed,
            num_generated_tokens=self._num_generated_tokens,
            num_steps=self._num_steps,
            num_drafts=self._num_drafts,
            num_draft_tokens=self._num_draft_tokens,
            num_accepted_tokens=self._num_accepted_tokens,
            accepted_per_position=list(self._accepted_per_position),
            timestamp=time.time(),
        )
