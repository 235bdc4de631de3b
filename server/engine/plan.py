"""The contracts between scheduler and runner: StepPlan (what to compute) and RunnerOutput.

Plan / execute / update: ``Scheduler.schedule() -> StepPlan``, ``ModelRunner.execute(plan) ->
RunnerOutput``, ``Scheduler.update(plan, output)``. Neither object holds tensors, except the
draft distributions a sampling drafter hands to verification (``spec_draft_probs``).

Per scheduled request ``r`` with ``n = num_scheduled_tokens[r.request_id]``, the runner computes
the tokens ``r.all_token_ids[r.num_computed_tokens : r.num_computed_tokens + n]`` at positions
``r.num_computed_tokens + i``, writing their K/V into the slots given by ``r.block_ids``
(slot of position p = ``block_ids[p // block_size] * block_size + p % block_size``). Under
speculation a decoding request's one scheduled token is the root of its draft tree
(``spec_trees``): the runner computes the whole tree, verifies it, compacts the accepted path's
K/V to consecutive positions, and returns the accepted drafts + one bonus token.

A request *samples* this step when its scheduled tokens reach the end of its known tokens
(``num_computed_tokens + n == num_tokens``); a prefill chunk that stops short samples nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from server.engine.request import Logprob, Request
from server.spec_decode.drafter import DraftKind, TopTokens
from server.spec_decode.tree import TokenTree


@dataclass
class StepPlan:
    # Requests to run this step, in batch order (the runner keeps this order).
    requests: list[Request]
    # request_id -> number of known tokens to compute this step (>= 1).
    num_scheduled_tokens: dict[str, int]
    # Requests that finished since the last plan: the runner drops any per-request state
    # (random generators, draft caches) it kept for them.
    finished_request_ids: set[str] = field(default_factory=set)
    # Requests preempted since the last plan. Their KV is gone (they resume by recompute) but
    # their random generators must survive, or a seeded request would re-draw from the start.
    preempted_request_ids: set[str] = field(default_factory=set)
    # Speculative decoding. spec_budgets: request_id -> draft slots the scheduler reserved
    # (token budget and KV slots) for a decoding request that may speculate: its cap, or less
    # when new prompts took the rest of the step (Scheduler's draft_reservation). The
    # engine core's Speculator then asks the policy how many to use and the drafter to fill
    # them: spec_trees holds each proposal to verify (node 0 = the request's last known token,
    # the one scheduled token of a decoding request) and num_spec_tokens its number of drafts.
    spec_budgets: dict[str, int] = field(default_factory=dict)
    spec_trees: dict[str, TokenTree] = field(default_factory=dict)
    num_spec_tokens: dict[str, int] = field(default_factory=dict)
    # How the drafter made children ("deterministic": n-gram / suffix / top-k; "sampled":
    # drawn from a draft distribution): sampled verification must use the matching rule.
    spec_draft_kind: DraftKind = "deterministic"
    # "sampled" drafts of non-greedy requests: request_id -> [n + 1, V] float32 on the model's
    # device, row i = the draft distribution node i's child was drawn from (the leaf's row is
    # unused). Rejection sampling needs q to stay lossless; greedy requests have no entry.
    spec_draft_probs: dict[str, Tensor] = field(default_factory=dict)
    # Requests still waiting for admission after this plan (queued or preempted): while there
    # are none, the running requests are all the work left (see Speculator's finish_together).
    num_waiting: int = 0

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values()) + sum(self.num_spec_tokens.values())

    def samples(self, request: Request) -> bool:
        n = self.num_scheduled_tokens[request.request_id]
        return request.num_computed_tokens + n == request.num_tokens

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class RunnerOutput:
    # request_id -> tokens produced this step, in order. Plain decoding: one token.
    # Speculative decoding: the accepted draft tokens + one bonus/correction token.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> one Logprob per sampled token (only for requests that asked for logprobs).
    logprobs: dict[str, list[Logprob]] = field(default_factory=dict)
    # request_id -> Logprob of each prompt token whose predicting position was computed this
    # step, in prompt order (only for requests that asked for prompt_logprobs). The first
    # prompt token has none.
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)
    # request_id -> draft nodes accepted by verification, in path order (root excluded): the
    # policy's acceptance estimates learn from which nodes of each tree were accepted.
    spec_accepted_nodes: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> why it failed this step (its logits were not finite): the engine fails
    # those requests alone; the rest of the batch goes on.
    failed: dict[str, str] = field(default_factory=dict)
    # The target's top-k guesses per computed row, for a drafter that recycles them (only
    # when the runner's feedback_top_k is set).
    top_tokens: TopTokens | None = None
    # Seconds the forward + sampling took.
    execute_time: float = 0.0
