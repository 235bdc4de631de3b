"""Scheduler as a plain object: budgets, chunked prefill, stops, preemption, aborts.

The runner is replaced by hand-written RunnerOutputs here on purpose: these tests pin down the
scheduler's bookkeeping; engine-level tests with a real model are in tests/engine/test_engine*.
"""

from __future__ import annotations

from server.config import CacheConfig, SchedulerConfig
from server.engine.plan import RunnerOutput, StepPlan
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import DraftReservation, Scheduler

EOS = 0


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 32,
    max_seqs: int = 8,
    block_size: int = 4,
    prefix: bool = True,
    max_spec_tokens: int = 0,
    draft_reservation: DraftReservation | None = None,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        num_blocks=num_blocks,
        max_model_len=1024,
        max_spec_tokens=max_spec_tokens,
        draft_reservation=draft_reservation,
    )


def add(s: Scheduler, rid: str, n_prompt: int, **params: object) -> Request:
    r = Request(rid, list(range(1, n_prompt + 1)), SamplingParams(**params), frozenset({EOS}), 1024)
    s.add_request(r)
    return r


def run_step(s: Scheduler, token: int = 7) -> tuple[StepPlan, list]:
    plan = s.schedule()
    out = RunnerOutput(
        sampled_token_ids={r.request_id: [token] for r in plan.requests if plan.samples(r)}
    )
    return plan, s.update(plan, out)


def test_budget_splits_prompts_into_chunks() -> None:
    s = make_scheduler(budget=16, prefix=False)
    a = add(s, "a", 20, max_tokens=4)
    b = add(s, "b", 10, max_tokens=4)
    plan, outs = run_step(s)
    assert plan.num_scheduled_tokens == {"a": 16}
    assert outs == [] and a.num_computed_tokens == 16
    plan, outs = run_step(s)
    # a finishes its prompt (4 tokens, samples); b gets the rest of the budget.
    assert plan.num_scheduled_tokens == {"a": 4, "b": 10}
    assert [o.request_id for o in outs] == ["a", "b"]
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    assert plan.total_num_scheduled_tokens == 14


def test_decode_steps_schedule_one_token_per_request_until_length() -> None:
    s = make_scheduler()
    r = add(s, "a", 3, max_tokens=3)
    finals = []
    for _ in range(3):
        _, outs = run_step(s)
        finals.append(outs[0].finish_reason)
    assert finals == [None, None, "length"]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert s.block_manager.num_used_blocks == 0 and not s.has_unfinished


def test_eos_stops_unless_ignored_and_stop_token_ids_report_the_reason() -> None:
    s = make_scheduler()
    add(s, "eos", 3, max_tokens=10)
    add(s, "ignore", 3, max_tokens=2, ignore_eos=True)
    add(s, "stopid", 3, max_tokens=10, stop_token_ids=(EOS,))
    _, outs = run_step(s, token=EOS)
    by_id = {o.request_id: o for o in outs}
    assert by_id["eos"].finish_reason == "stop" and by_id["eos"].stop_reason is None
    assert by_id["stopid"].finish_reason == "stop" and by_id["stopid"].stop_reason == EOS
    assert by_id["ignore"].finish_reason is None


def test_max_num_seqs_caps_the_running_set() -> None:
    s = make_scheduler(max_seqs=2, budget=100)
    for i in range(4):
        add(s, str(i), 3, max_tokens=5)
    plan, _ = run_step(s)
    assert len(plan.requests) == 2 and len(s.waiting) == 2
    assert plan.num_waiting == 2  # what the speculation policy reads: is more work queued?


def test_preemption_frees_blocks_and_the_request_resumes_with_its_tokens() -> None:
    # 6 blocks of 4 tokens. Two requests of 8 prompt tokens take 4 blocks; as they decode
    # they need a third block each, which isn't there for both.
    s = make_scheduler(num_blocks=6, budget=64, prefix=False)
    a = add(s, "a", 8, max_tokens=12)
    b = add(s, "b", 8, max_tokens=12)
    for _ in range(40):
        if not s.has_unfinished:
            break
        run_step(s)
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [7] * 12 and b.output_token_ids == [7] * 12
    assert b.num_preemptions >= 1
    assert s.stats().num_preemptions >= 1
    assert s.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_and_tells_the_runner() -> None:
    s = make_scheduler()
    add(s, "a", 9, max_tokens=10)
    add(s, "b", 9, max_tokens=10)
    run_step(s)
    out = s.abort_request("a")
    assert out is not None and out.finish_reason == "abort"
    assert s.abort_request("a") is None  # twice is harmless
    plan, _ = run_step(s)
    assert "a" in plan.finished_request_ids
    s.abort_request("b")
    assert s.block_manager.num_used_blocks == 0 and not s.has_unfinished


def test_prefix_cache_hit_is_counted_and_skips_computation() -> None:
    s = make_scheduler(budget=64)
    add(s, "a", 17, max_tokens=1)
    run_step(s)
    b = add(s, "b", 17, max_tokens=1)
    plan, outs = run_step(s)
    assert b.num_cached_tokens == 16 and plan.num_scheduled_tokens["b"] == 1
    assert outs[0].num_cached_tokens == 16
    stats = s.stats()
    assert stats.prefix_cache_hits == 16 and stats.prefix_cache_queries == 34


def test_prompts_are_cut_only_at_block_boundaries() -> None:
    """A partial prompt chunk ends on a block boundary (so each block of a prompt is computed
    in one step, see server/model/attention.py); a prompt that won't fit waits a step rather
    than be cut mid-block; past the prompt (a preempted request's generated tokens) and when
    nothing else is scheduled, the budget is used whole."""
    s = make_scheduler(budget=10, block_size=4, prefix=False)
    add(s, "a", 3, max_tokens=8)
    b = add(s, "b", 13, max_tokens=8)
    plan, _ = run_step(s)
    # a takes 3; b's 7 would end mid-block (10): it takes 4 (up to position 4).
    assert plan.num_scheduled_tokens == {"a": 3, "b": 4}
    plan, _ = run_step(s)
    # a decodes 1; b has 9 left, 9 fit but end mid-block at 13 = its prompt end: allowed.
    assert plan.num_scheduled_tokens == {"a": 1, "b": 9}
    assert b.num_computed_tokens == 13

    s = make_scheduler(budget=6, block_size=4, prefix=False)
    add(s, "a", 2, max_tokens=8)
    c = add(s, "c", 11, max_tokens=8)
    plan, _ = run_step(s)
    assert plan.num_scheduled_tokens == {"a": 2, "c": 4}  # the 4 left end on a boundary
    plan, _ = run_step(s)
    # a decodes; c could take 5 (to position 9, mid-block): it takes the block 4..8.
    assert plan.num_scheduled_tokens == {"a": 1, "c": 4}
    plan, _ = run_step(s)
    assert plan.num_scheduled_tokens == {"a": 1, "c": 3}  # up to its prompt end
    assert c.num_computed_tokens == 11

    # A budget below one block: alone in the step, the prompt is cut where the budget ends.
    s = make_scheduler(budget=3, block_size=4, prefix=False)
    d = add(s, "d", 10, max_tokens=2)
    plan, _ = run_step(s)
    assert plan.num_scheduled_tokens == {"d": 3} and d.num_computed_tokens == 3


def test_draft_slots_beyond_the_reservation_come_from_what_admission_leaves() -> None:
    """Decoding requests hold only their reservation of draft slots before a new prompt is
    admitted; the rest of their cap comes from the budget the prompt leaves, in running order,
    and never from blocks that would preempt anyone. Without a reservation the whole cap is
    held first (what fixed budgets need)."""
    held = lambda request, cap: 1  # noqa: E731
    s = make_scheduler(
        budget=24, block_size=4, prefix=False, max_spec_tokens=8, draft_reservation=held
    )
    add(s, "a", 4, max_tokens=32)
    add(s, "b", 4, max_tokens=32)
    run_step(s)  # both prompts
    add(s, "c", 40, max_tokens=4)
    plan, _ = run_step(s)
    # a, b: 1 token + 1 held draft slot each; c's chunk: 20 tokens to a block boundary; the
    # 0 left give no top-up.
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 20}
    assert plan.spec_budgets == {"a": 1, "b": 1}
    plan, _ = run_step(s)
    # c's remaining 20 fit with 0 left: again only the held slots.
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 20}
    assert plan.spec_budgets == {"a": 1, "b": 1}
    plan, _ = run_step(s)
    # Nothing waits: a and b get their whole cap (8 each), c its own (2: the room left before
    # its max_tokens, less the bonus token).
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 1}
    assert plan.spec_budgets == {"a": 8, "b": 8, "c": 2}

    s = make_scheduler(budget=24, block_size=4, prefix=False, max_spec_tokens=8)
    add(s, "a", 4, max_tokens=32)
    add(s, "b", 4, max_tokens=32)
    run_step(s)
    add(s, "c", 40, max_tokens=4)
    plan, _ = run_step(s)
    # The whole cap held first: 24 - 2 x 9 = 6 left, c's chunk is 4 (a block boundary).
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 4}
    assert plan.spec_budgets == {"a": 8, "b": 8}

    # Short of blocks: the top-up is skipped rather than preempting anyone.
    s = make_scheduler(
        num_blocks=6,
        budget=64,
        block_size=4,
        prefix=False,
        max_spec_tokens=8,
        draft_reservation=held,
    )
    a = add(s, "a", 4, max_tokens=32)
    b = add(s, "b", 4, max_tokens=32)
    run_step(s)
    plan = s.schedule()
    # 6 blocks of 4: a and b hold 2 each with their held slot (6 tokens); a's top-up to 8
    # drafts covers 13 tokens (4 blocks) and takes the last 2 free; b's finds none, keeps 1.
    assert plan.requests == [a, b] and not plan.preempted_request_ids
    assert plan.spec_budgets == {"a": 8, "b": 1}
    assert s.block_manager.num_free_blocks == 0
