"""The engine core: owns every request; one step = schedule, execute, update.

It runs in its own process behind the messages in ``core_proc.py`` when served, and directly
in-process for offline use (``server.engine.offline``) and tests.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine.cost_profile import profile_step_costs
from server.engine.outputs import EngineCoreOutput
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerStats
from server.engine.speculation import Speculator
from server.model.runner import ModelRunner
from server.spec_decode.cost_model import CostModel
from server.spec_decode.draft_model import draft_kv_bytes_per_block
from server.spec_decode.drafter import (
    Drafter,
    FinishedRequestConsumer,
    TopTokenConsumer,
    implements,
)
from server.spec_decode.drafters import MODEL_FREE_METHODS, make_drafter, model_free_drafter
from server.spec_decode.policies import make_policy, needs_cost_model
from server.spec_decode.policy import PolicyContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What the API side needs to know about the loaded engine."""

    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: frozenset[int]


class EngineCore:
    def __init__(self, config: EngineConfig, finish_together: bool = False) -> None:
        """``finish_together``: every request is returned only when the last one is done
        (offline batches), which is what the speculation policy then shortens."""
        self.config = config
        spec = config.speculative
        draft_kv = 0
        if spec.enabled and spec.method == "draft_model":
            assert spec.model is not None  # SpeculativeConfig checks it
            draft_kv = draft_kv_bytes_per_block(
                spec.model, config.model.dtype, config.model.device, config.cache.block_size
            )
        self.runner = ModelRunner(config, draft_kv_bytes_per_block=draft_kv)
        block_size = config.cache.block_size
        capacity = self.runner.num_blocks * block_size
        max_model_len = self.runner.max_model_len
        if max_model_len > capacity:
            # A request longer than the whole cache could never run, even alone.
            logger.warning(
                "max_model_len %d exceeds the KV cache capacity (%d tokens); capping it",
                max_model_len,
                capacity,
            )
            max_model_len = capacity
        self.info = EngineInfo(
            max_model_len=max_model_len,
            num_blocks=self.runner.num_blocks,
            block_size=block_size,
            vocab_size=self.runner.vocab_size,
            eos_token_ids=frozenset(self.runner.eos_token_ids),
        )
        self.drafter: Drafter | None = None
        self.speculator: Speculator | None = None
        if spec.enabled:
            self.drafter = _build_drafter(config, self.runner)
            if isinstance(self.drafter, TopTokenConsumer):
                self.runner.feedback_top_k = self.drafter.feedback_top_k
            self.speculator = Speculator(
                self.drafter,
                make_policy(spec.policy, self._policy_context(self.drafter)),
                spec.num_speculative_tokens,
                finish_together=finish_together,
            )
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            self.runner.num_blocks,
            max_model_len,
            max_spec_tokens=spec.num_speculative_tokens if self.drafter else 0,
            draft_reservation=self.speculator.reservation if self.speculator else None,
        )

    def _policy_context(self, drafter: Drafter) -> PolicyContext:
        """The policy's inputs; cost-aware policies get a cost model seeded by a profile."""
        spec = self.config.speculative
        cost_model = None
        if needs_cost_model(spec.policy):
            cost_model = CostModel()
            cost_model.add_profile(
                profile_step_costs(
                    self.runner,
                    drafter,
                    spec.num_speculative_tokens,
                    self.config.scheduler.max_num_seqs,
                    self.config.scheduler.max_num_batched_tokens,
                    spec.cost_profile_seconds,
                )
            )
        return PolicyContext(
            max_spec_tokens=spec.num_speculative_tokens,
            free_proposals=drafter.free_proposals,
            score_edges=drafter.score_edges,
            cost_model=cost_model,
        )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> EngineCoreOutput | None:
        """Queues a request; returns an error output instead if it can never run."""
        error = self._validate(prompt_token_ids, params)
        if error is not None:
            return EngineCoreOutput(request_id, [], finish_reason="abort", error=error)
        self.scheduler.add_request(
            Request(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                eos_token_ids=self.info.eos_token_ids,
                max_total_tokens=self.info.max_model_len,
            )
        )
        return None

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> str | None:
        # The API checks these first with friendlier messages; the engine still refuses work
        # that would break its invariants, whoever sends it.
        if not prompt_token_ids:
            return "the prompt is empty"
        if len(prompt_token_ids) >= self.info.max_model_len:
            return (
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.info.max_model_len} tokens including the output"
            )
        vocab = self.info.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            return f"token id {bad} is out of range for the vocabulary (size {vocab})"
        return None

    def abort(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = [self.scheduler.abort_request(rid) for rid in request_ids]
        return [o for o in outputs if o is not None]

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        try:
            if self.drafter is not None:
                # Before proposing: a preempted request's draft K/V went with its blocks.
                self.drafter.release(plan.finished_request_ids)
                self.drafter.reset(plan.preempted_request_ids)
            if self.speculator is not None:
                self.speculator.fill(plan)
            if self.runner.faults is not None:
                self.runner.faults.before_step(plan.requests)
            output = self.runner.execute(plan)
        except Exception:
            # One bad step must not end the loop: fail the requests it carried, keep serving.
            message = traceback.format_exc()
            logger.error(
                "engine step failed; aborting requests %s\n%s",
                [r.request_id for r in plan.requests],
                message,
            )
            failed = self.abort([r.request_id for r in plan.requests])
            for out in failed:
                out.error = "internal error in the engine step: " + message.splitlines()[-1]
            return failed
        # Requests whose logits were not finite fail alone (aborted, blocks freed) before the
        # scheduler takes the rest of the step's results.
        failed = self.abort(list(output.failed))
        for out in failed:
            out.error = output.failed[out.request_id]
        if output.top_tokens is not None and isinstance(self.drafter, TopTokenConsumer):
            self.drafter.observe_top_tokens(output.top_tokens)
        outputs = failed + self.scheduler.update(plan, output)
        if implements(type(self.drafter), FinishedRequestConsumer):
            self.drafter.observe_finished(r for r in plan.requests if r.is_finished)
        if self.speculator is not None:
            # The whole step's wall time: what the policy's goodput is measured against.
            self.speculator.observe(plan, output, time.perf_counter() - start)
        return outputs

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.speculator is not None:
            stats.speculation = self.speculator.stats()
        return stats


def _build_drafter(config: EngineConfig, runner: ModelRunner) -> Drafter:
    """The drafter named by --speculative-config, with its options.

    Model drafters run over the target's block tables: their caches take the target runner's
    num_blocks / block_size, and their dtype, device and attention backend are the target's.
    """
    spec = config.speculative
    if spec.method == "draft_model":
        assert spec.model is not None  # SpeculativeConfig checks it
        return make_drafter(
            "draft_model",
            model=spec.model,
            target_model=config.model.model,
            target_tokenizer=runner.tokenizer,
            target_eos_token_ids=frozenset(runner.eos_token_ids),
            target_vocab_size=runner.vocab_size,
            dtype=config.model.dtype,
            device=str(runner.device),
            attention_backend=config.attention_backend,
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            plan_cpu_linears=config.model.cpu_linear_plan,
        )
    if spec.method == "synthetic":
        return make_drafter(
            "synthetic",
            model=runner.model,
            kv_cache=runner.kv_cache,
            num_blocks=runner.num_blocks,
            block_size=runner.block_size,
            target_vocab_size=runner.vocab_size,
            acceptance_rate=spec.acceptance_rate,
        )
    if spec.method in MODEL_FREE_METHODS:
        return model_free_drafter(spec, runner.vocab_size)
    raise ValueError(f"unknown speculative method {spec.method!r}")
