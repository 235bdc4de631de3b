"""One simulated run: one policy serving one arrival trace on a virtual clock.

The engine core's step, with the runner and drafter replaced (server/engine/core.py):
schedule -> drafter release/reset -> speculator.fill -> simulated execute -> scheduler.update
-> speculator.observe(step seconds). The clock advances by the true cost of each step's shape;
arrivals wait for the next step (as requests reaching a busy engine do); an idle engine jumps
to the next arrival. Tokens count as delivered at the end of the step that produced them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loadtest.sim.config import OFF, EngineSettings, PolicySpec
from loadtest.sim.cost import TrueCost, startup_profile
from loadtest.sim.drafter import SimDrafter
from loadtest.sim.runner import SimRunner
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.speculation import Speculator, plan_shape
from server.spec_decode.cost_model import CostModel
from server.spec_decode.policies import make_policy, needs_cost_model
from server.spec_decode.policy import PolicyContext

# A run that takes more steps than this is stuck (a bug, or a request that can never fit).
_MAX_STEPS = 5_000_000


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    alpha: float
    # Seed of the request's prompt tokens and per-position acceptance draws.
    seed: int = 0


@dataclass
class RequestRecord:
    arrival: float
    prompt_len: int
    output_len: int
    alpha: float
    first_token: float = math.nan
    finish: float = math.nan
    num_output_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first (NaN for one-token outputs)."""
        if self.num_output_tokens < 2:
            return math.nan
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)


@dataclass
class StepRecord:
    start: float
    seconds: float  # true
    predicted: float  # the policy's cost model, before the step (NaN: no cost model)
    num_requests: int
    num_tokens: int  # rows through the target, drafts included
    num_drafts: int
    # Mean draft tokens verified per request that could speculate (NaN: none could).
    mean_budget: float
    emitted: int  # tokens appended to requests


@dataclass
class RunResult:
    policy: str
    requests: list[RequestRecord]
    steps: list[StepRecord]
    wall_seconds: float
    # Wall seconds inside speculator.fill + observe (the policy's Python cost).
    policy_wall_seconds: float
    num_preemptions: int
    num_draft_tokens: int
    num_accepted_tokens: int
    # Speculator's budget statistics, as /metrics exports them.
    budget_sum: int = 0
    budget_count: int = 0
    blocks_in_use: int = 0
    unfinished: int = 0
    cost_model_coefficients: dict[str, float] = field(default_factory=dict)


def simulate(
    requests: Sequence[SimRequest],
    policy: PolicySpec,
    engine: EngineSettings,
    drafter_mode: str,
    cost: TrueCost,
    profile: bool = True,
    vocab_size: int = 32000,
) -> RunResult:
    """Serves ``requests`` (any order; by arrival) with ``policy``; see the module docstring."""
    pending = sorted(requests, key=lambda r: (r.arrival, r.request_id))
    drafter = SimDrafter(drafter_mode)
    runner = SimRunner()
    speculator, cost_model = _speculator(policy, engine, drafter, cost, profile)
    k = policy.max_spec_tokens if speculator is not None else 0
    scheduler = Scheduler(
        engine.scheduler,
        engine.cache,
        engine.num_blocks,
        engine.max_model_len,
        max_spec_tokens=k,
        draft_reservation=speculator.reservation if speculator is not None else None,
    )
    records: dict[str, RequestRecord] = {}
    steps: list[StepRecord] = []
    now = 0.0
    next_arrival = 0
    policy_wall = 0.0
    wall_start = time.perf_counter()
    while next_arrival < len(pending) or scheduler.has_unfinished:
        while next_arrival < len(pending) and pending[next_arrival].arrival <= now:
            sim = pending[next_arrival]
            scheduler.add_request(_request(sim, engine.max_model_len, vocab_size))
            records[sim.request_id] = RequestRecord(
                sim.arrival, sim.prompt_len, sim.output_len, sim.alpha
            )
            rng = np.random.default_rng([sim.seed, 1])
            runner.add(sim.request_id, sim.alpha, rng.random(sim.output_len + k + 1))
            next_arrival += 1
        plan = scheduler.schedule()
        if plan.is_empty:
            if next_arrival >= len(pending):
                raise RuntimeError(
                    f"{len(scheduler.waiting)} requests can never be scheduled (too few KV blocks?)"
                )
            now = max(now, pending[next_arrival].arrival)
            continue
        if len(steps) >= _MAX_STEPS:
            raise RuntimeError(f"no end after {_MAX_STEPS} steps")
        drafter.begin_step()
        drafter.release(plan.finished_request_ids)
        drafter.reset(plan.preempted_request_ids)
        runner.release(plan.finished_request_ids)
        t0 = time.perf_counter()
        if speculator is not None:
            speculator.fill(plan)
        policy_wall += time.perf_counter() - t0
        output = runner.execute(plan)
        shape = plan_shape(plan, drafter.last_work)
        proposed = 0.0
        if drafter.free_proposals and plan.spec_budgets:
            proposed = min(1.0, drafter.proposed / len(plan.spec_budgets))
        seconds = cost.seconds(shape, proposed=proposed)
        output.execute_time = seconds
        # The policy's view before it learns from this step (what it allocated against).
        predicted = cost_model.predict(shape) if cost_model is not None else math.nan
        end = now + seconds
        emitted = 0
        for out in scheduler.update(plan, output):
            rec = records[out.request_id]
            if out.new_token_ids:
                emitted += len(out.new_token_ids)
                if math.isnan(rec.first_token):
                    rec.first_token = end
                rec.num_output_tokens += len(out.new_token_ids)
            if out.finished:
                rec.finish = end
                rec.num_draft_tokens = out.num_draft_tokens
                rec.num_accepted_tokens = out.num_accepted_tokens
        t0 = time.perf_counter()
        if speculator is not None:
            speculator.observe(plan, output, seconds)
        policy_wall += time.perf_counter() - t0
        drafts = sum(plan.num_spec_tokens.values())
        steps.append(
            StepRecord(
                start=now,
                seconds=seconds,
                predicted=predicted,
                num_requests=len(plan.requests),
                num_tokens=shape.num_tokens,
                num_drafts=drafts,
                mean_budget=drafts / len(plan.spec_budgets) if plan.spec_budgets else math.nan,
                emitted=emitted,
            )
        )
        now = end
    stats = scheduler.stats()
    spec = speculator.stats() if speculator is not None else None
    return RunResult(
        policy=policy.label,
        requests=list(records.values()),
        steps=steps,
        wall_seconds=time.perf_counter() - wall_start,
        policy_wall_seconds=policy_wall,
        num_preemptions=stats.num_preemptions,
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_tokens=stats.num_accepted_tokens,
        budget_sum=spec.budget_sum if spec else 0,
        budget_count=sum(spec.budget_counts) if spec else 0,
        blocks_in_use=scheduler.block_manager.num_used_blocks,
        unfinished=sum(math.isnan(r.finish) for r in records.values()),
        cost_model_coefficients=cost_model.coefficients if cost_model is not None else {},
    )


def _speculator(
    policy: PolicySpec,
    engine: EngineSettings,
    drafter: SimDrafter,
    cost: TrueCost,
    profile: bool,
) -> tuple[Speculator | None, CostModel | None]:
    """The policy built as EngineCore builds it (cost-aware ones get a profiled CostModel)."""
    if policy.name == OFF:
        return None, None
    cost_model = None
    if needs_cost_model(policy.name):
        cost_model = CostModel()
        if profile:
            cost_model.add_profile(
                startup_profile(
                    cost,
                    drafter,
                    policy.max_spec_tokens,
                    engine.scheduler.max_num_seqs,
                    engine.scheduler.max_num_batched_tokens,
                )
            )
    context = PolicyContext(
        max_spec_tokens=policy.max_spec_tokens,
        free_proposals=drafter.free_proposals,
        score_edges=drafter.score_edges,
        cost_model=cost_model,
    )
    spec = Speculator(drafter, make_policy(policy.name, context), policy.max_spec_tokens)
    return spec, cost_model


def _request(sim: SimRequest, max_model_len: int, vocab_size: int) -> Request:
    if sim.prompt_len < 1 or sim.output_len < 1:
        raise ValueError(f"{sim.request_id}: prompt and output need >= 1 token")
    if sim.prompt_len + sim.output_len > max_model_len:
        raise ValueError(
            f"{sim.request_id}: {sim.prompt_len} + {sim.output_len} tokens exceed "
            f"max_model_len {max_model_len}"
        )
    # Random prompts: no two requests share a prefix-cache block (as the sweeps' per-rate
    # prefixes make sure of on the real server).
    tokens = np.random.default_rng([sim.seed, 0]).integers(3, vocab_size, sim.prompt_len)
    params = SamplingParams(max_tokens=sim.output_len, temperature=0.0, ignore_eos=True)
    return Request(sim.request_id, tokens.tolist(), params, frozenset(), max_model_len, sim.arrival)
