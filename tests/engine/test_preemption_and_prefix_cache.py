"""Preemption by recompute and prefix caching, on a real (tiny) model."""

from __future__ import annotations

from pathlib import Path

from server.engine.sampling_params import SamplingParams
from tests.engine.test_engine_greedy import engine_for, random_prompts


def test_sixteen_requests_in_a_too_small_cache_all_finish_as_if_alone(
    tiny_llama_dir: Path,
) -> None:
    prompts = random_prompts(300, tuple(8 + 3 * i for i in range(16)), seed=1)
    # Half greedy, half seeded sampling: a seeded request must draw the same tokens after
    # being preempted and recomputed as it does alone.
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i, ignore_eos=True)
        for i in range(16)
    ]
    # 20 blocks of 8 tokens = 160 tokens; the 16 requests need ~16 x 7 blocks together.
    engine = engine_for(tiny_llama_dir, num_blocks=20, budget=64)
    together = engine.generate(prompts, params)
    stats = engine.core.stats()
    assert stats.num_preemptions > 0, "the cache was meant to be too small"
    assert stats.num_blocks_used == 0

    alone_engine = engine_for(tiny_llama_dir, num_blocks=256, budget=64)
    for prompt, p, got in zip(prompts, params, together, strict=True):
        (alone,) = alone_engine.generate([prompt], p)
        assert got.finish_reason == "length"
        assert got.token_ids == alone.token_ids


def test_shared_system_prompt_is_computed_once_with_identical_output(
    tiny_llama_dir: Path,
) -> None:
    system, q1, q2 = random_prompts(300, (70, 6, 9), seed=2)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    engine = engine_for(tiny_llama_dir)
    engine.generate([system + q1], params)
    computed_before = engine.core.stats().num_prompt_tokens_computed
    (second,) = engine.generate([system + q2], params)
    computed = engine.core.stats().num_prompt_tokens_computed - computed_before
    # 70 shared tokens = 8 full blocks of 8 reused; only the rest is computed.
    assert second.num_cached_tokens == 64
    assert computed == len(system + q2) - 64
    assert engine.core.stats().prefix_cache_hits == 64

    cold = engine_for(tiny_llama_dir)
    (reference,) = cold.generate([system + q2], params)
    assert second.token_ids == reference.token_ids
