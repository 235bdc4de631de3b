"""The start-up profile that seeds the cost model: real forward passes at a grid of shapes.

Before serving, a few seconds of synthetic steps (random tokens, greedy) run through the real
runner, and for model drafters the real drafter: decode batches of 1..32 requests with 0..k
draft tokens each, and prefill chunks alone and mixed with decodes. Their measured times give
the online cost model the row counts and batch sizes it would otherwise meet only by chance,
so the policy's first allocations are already priced. The requests are the profile's own,
on KV blocks nobody holds yet (the block manager never sees them), and their drafter state
is released afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from server.engine.plan import StepPlan
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.speculation import plan_shape
from server.model.runner import ModelRunner
from server.spec_decode.cost_model import StepShape
from server.spec_decode.drafter import Drafter, DraftWork
from server.spec_decode.tree import TokenTree

logger = logging.getLogger(__name__)

_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
_PREFILL_CHUNKS = (32, 128, 512)
_CONTEXT = 64
_REPEATS = 2


def profile_grid(
    max_spec_tokens: int, max_num_seqs: int, max_num_batched_tokens: int
) -> list[tuple[int, int, int]]:
    """(decoding requests, drafts per request, prefill chunk tokens) per profiled shape."""
    ks = sorted({k for k in (0, 1, 2, 3, 4, max_spec_tokens // 2, max_spec_tokens)})
    ks = [k for k in ks if k <= max_spec_tokens]
    grid = []
    for b in _BATCH_SIZES:
        for k in ks:
            if b <= max_num_seqs and b * (1 + k) <= max_num_batched_tokens:
                grid.append((b, k, 0))
    for chunk in _PREFILL_CHUNKS:
        for b in (0, 4):
            if chunk + b <= max_num_batched_tokens and b + 1 <= max_num_seqs:
                grid.append((b, 0, chunk))
    # Cheapest first: if the time budget runs out (a slow or busy machine), what is left
    # unprofiled is the large shapes, which online steps measure soon enough anyway.
    return sorted(grid, key=lambda shape: (shape[0] * (1 + shape[1]) + shape[2], shape))


def profile_step_costs(
    runner: ModelRunner,
    drafter: Drafter | None,
    max_spec_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    time_budget_s: float,
) -> list[tuple[StepShape, float]]:
    """Runs the grid (each shape ``_REPEATS`` times) within ``time_budget_s``; returns
    (shape, seconds) samples. Logs progress as it goes."""
    grid = profile_grid(max_spec_tokens, max_num_seqs, max_num_batched_tokens)
    samples: list[tuple[StepShape, float]] = []
    if time_budget_s <= 0 or not grid:
        return samples
    rng = torch.Generator().manual_seed(0)
    start = None  # the budget starts after the warm-up step (first-touch costs, thread spin-up)
    logger.info("profiling step costs: %d shapes (budget %.0f s)", len(grid), time_budget_s)
    model_drafter = drafter is not None and not drafter.free_proposals
    for done, (b, k, chunk) in enumerate(grid, start=1):
        for repeat in range(_REPEATS + (1 if done == 1 else 0)):
            plan = _synthetic_plan(runner, rng, b, k, chunk)
            if plan is None:
                break
            t0 = time.perf_counter()
            work = DraftWork()
            if model_drafter and k > 0:
                assert drafter is not None
                decoding = [r for r in plan.requests if r.request_id in plan.spec_trees]
                drafter.propose(decoding, [k] * len(decoding))
                work = drafter.last_work
            runner.execute(plan)
            seconds = time.perf_counter() - t0
            if start is None:
                start = time.perf_counter()
            if drafter is not None:
                drafter.release([r.request_id for r in plan.requests])
            if not (done == 1 and repeat == 0):  # the very first step warms up
                samples.append((plan_shape(plan, work), seconds))
        elapsed = time.perf_counter() - (start or time.perf_counter())
        if done % 8 == 0 or done == len(grid):
            logger.info("profiling step costs: %d/%d shapes, %.1f s", done, len(grid), elapsed)
        if elapsed > time_budget_s:
            logger.warning(
                "step-cost profile stopped at its %.0f s budget after %d/%d shapes",
                time_budget_s,
                done,
                len(grid),
            )
            break
    return samples


def _synthetic_plan(
    runner: ModelRunner,
    rng: torch.Generator,
    num_decoding: int,
    drafts: int,
    chunk: int,
) -> StepPlan | None:
    """A plan of ``num_decoding`` requests decoding at context ``_CONTEXT`` with a chain of
    ``drafts`` random drafts each, plus one request prefilling ``chunk`` prompt tokens, on
    blocks 0, 1, ... (None when the cache or the context is too small for it)."""
    vocab = runner.vocab_size
    bs = runner.block_size
    context = min(_CONTEXT, runner.max_model_len - drafts - 2)
    if context < 2:
        return None
    requests: list[Request] = []
    num_tokens: dict[str, int] = {}
    trees: dict[str, TokenTree] = {}
    params = SamplingParams(max_tokens=drafts + 2, temperature=0.0, ignore_eos=True)
    shapes = [(context, 1, drafts)] * num_decoding + ([(chunk, chunk, 0)] if chunk else [])
    need = sum(-(-(length + k) // bs) for length, _, k in shapes)
    if need > runner.num_blocks or (chunk and chunk >= runner.max_model_len):
        return None
    it: Iterator[int] = iter(range(need))
    for i, (length, n, k) in enumerate(shapes):
        tokens = torch.randint(0, vocab, (length,), generator=rng).tolist()
        r = Request(f"profile-{i}", tokens, params, frozenset(), runner.max_model_len)
        r.num_computed_tokens = length - n
        r.block_ids = [next(it) for _ in range(-(-(length + k) // bs))]
        requests.append(r)
        num_tokens[r.request_id] = n
        if k > 0:
            drafted = torch.randint(0, vocab, (k,), generator=rng).tolist()
            trees[r.request_id] = TokenTree.chain(tokens[-1], drafted)
    plan = StepPlan(requests, num_tokens)
    plan.spec_trees = trees
    plan.num_spec_tokens = {rid: t.num_drafts for rid, t in trees.items()}
    plan.spec_budgets = dict(plan.num_spec_tokens)
    return plan
