"""policy_replay: one cost table for every configuration, and the steps it records."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.policy_replay import StepRecord, cost_table, price, record_decode_steps, score
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams


def steps(requests: int, rows: int, seconds: list[float], emitted: int = 1) -> list[StepRecord]:
    return [StepRecord(requests, rows, emitted, s) for s in seconds]


def test_the_same_decisions_replay_alike_however_busy_the_host_was() -> None:
    quiet = steps(1, 1, [0.020] * 6) + steps(1, 3, [0.025] * 6, emitted=2)
    busy = steps(1, 1, [0.030] * 6) + steps(1, 3, [0.040] * 6, emitted=2)
    table = cost_table(quiet + busy)
    a, b = score(quiet, table), score(busy, table)
    assert a.measured_tokens_per_s > 1.4 * b.measured_tokens_per_s
    assert a.replayed_tokens_per_s == b.replayed_tokens_per_s
    assert a.priced_share == 1.0 and a.rows_histogram == {1: 6, 3: 6}


def test_better_decisions_replay_faster() -> None:
    plain = steps(1, 1, [0.020] * 10)
    drafting = steps(1, 3, [0.026] * 10, emitted=2)  # 2 tokens for 1.3x the time
    table = cost_table(plain + drafting)
    assert score(drafting, table).replayed_tokens_per_s == pytest.approx(
        2 / 1.3 * score(plain, table).replayed_tokens_per_s, rel=1e-3
    )


def test_a_rare_shape_is_interpolated_or_pays_its_own_time() -> None:
    table = cost_table(steps(1, 1, [0.02] * 5) + steps(1, 5, [0.04] * 5) + steps(1, 3, [9.0]))
    assert (1, 3) not in table  # one sample: below min_samples
    assert price(StepRecord(1, 3, 1, 9.0), table) == (pytest.approx(0.03), True)
    assert price(StepRecord(1, 9, 1, 0.07), table) == (0.07, False)  # beyond 5 rows
    assert price(StepRecord(2, 2, 2, 0.05), table) == (0.05, False)  # no 2-request shapes


def test_records_only_decode_steps_with_their_drafts(tiny_llama_dir: Path) -> None:
    engine = OfflineEngine(
        EngineConfig(
            model=ModelConfig(model=str(tiny_llama_dir), dtype="float32", quantization="none"),
            cache=CacheConfig(block_size=8, num_blocks=128),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
            speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=2, policy="fixed"),
            separate_process=False,
        )
    )
    records: list[StepRecord] = []
    record_decode_steps(engine, records)
    prompt = [5, 6, 7, 8] * 6  # repetitive: the n-gram drafter proposes
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (out,) = engine.generate([prompt], params)
    # The prefill step (which samples the first token) is not recorded; every later token is
    # (the last step may emit past max_tokens: the output is cut there).
    assert len(out.token_ids) - 1 <= sum(r.emitted for r in records) <= len(out.token_ids) + 1
    assert all(r.requests == 1 and 1 <= r.rows <= 3 and r.seconds > 0 for r in records)
    assert engine.core.stats().num_drafts == sum(r.rows > 1 for r in records)
