"""Drives a ModelRunner with hand-made StepPlans: a minimal scheduler for model tests.

Chunked prefill under a per-step token budget, decode, lazily allocated and deliberately
scattered KV blocks. References are transformers' own forward / generate.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from server.config import CacheConfig, EngineConfig, ModelConfig
from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.model.runner import ModelRunner


def make_runner(
    path: Path | str,
    dtype: str = "float32",
    block_size: int = 4,
    num_blocks: int = 256,
    device: str = "cpu",
) -> ModelRunner:
    cfg = EngineConfig(
        model=ModelConfig(model=str(path), dtype=dtype, device=device),  # type: ignore[arg-type]
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        attention_backend="torch",
    )
    return ModelRunner(cfg)


def make_request(rid: str, prompt: list[int], **params: object) -> Request:
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 10_000, **params})  # type: ignore[arg-type]
    return Request(rid, list(prompt), sp, eos_token_ids=frozenset(), max_total_tokens=1 << 20)


class MiniScheduler:
    """Schedules every request each step: decode = 1 token, prefill = chunks of the budget."""

    def __init__(self, runner: ModelRunner, token_budget: int, seed: int = 0) -> None:
        self.runner = runner
        self.budget = token_budget
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)  # scattered blocks catch table bugs
        self.requests: list[Request] = []
        self.finished: set[str] = set()

    def add(self, request: Request) -> None:
        self.requests.append(request)

    def plan(self) -> StepPlan:
        left = self.budget
        scheduled: dict[str, int] = {}
        reqs: list[Request] = []
        for r in self.requests:
            n = min(r.num_tokens - r.num_computed_tokens, left)
            if n <= 0:
                continue
            need = -(-(r.num_computed_tokens + n) // self.runner.block_size)
            while len(r.block_ids) < need:
                r.block_ids.append(self.free.pop())
            scheduled[r.request_id] = n
            reqs.append(r)
            left -= n
        plan = StepPlan(reqs, scheduled, finished_request_ids=self.finished)
        self.finished = set()
        return plan

    def update(self, plan: StepPlan, out: RunnerOutput) -> None:
        for r in plan.requests:
            r.num_computed_tokens += plan.num_scheduled_tokens[r.request_id]
            for t in out.sampled_token_ids.get(r.request_id, []):
                r.append_output_token(t)

    def finish(self, request: Request) -> None:
        self.requests.remove(request)
        self.free.extend(request.block_ids)
        self.finished.add(request.request_id)

    def step(self) -> RunnerOutput:
        plan = self.plan()
        out = self.runner.execute(plan)
        self.update(plan, out)
        return out

    def run(self, max_new: int) -> list[RunnerOutput]:
        """Steps until every request has max_new output tokens (finishing each then)."""
        outs = []
        while self.requests:
            outs.append(self.step())
            for r in list(self.requests):
                if r.num_output_tokens >= max_new:
                    self.finish(r)
        return outs


def hf_greedy(model: object, prompt: list[int], max_new: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, EOS ignored (exactly max_new tokens)."""
    model.generation_config.eos_token_id = None  # type: ignore[attr-defined]
    ids = torch.tensor([prompt], device=model.device)  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
