"""Speculative decoding in the whole engine: outputs identical to decoding without it.

Greedy identity is the contract: with any drafter, budget, batch composition or preemption,
every request gets exactly the tokens plain greedy decoding gives. Sampled requests keep the
target distribution (tests/spec_decode/test_verify.py checks the rules statistically); here
they must stay reproducible under a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from server.engine.offline import Completion, OfflineEngine
from server.engine.sampling_params import SamplingParams

DATASETS = Path(__file__).resolve().parents[2] / "loadtest" / "datasets"
DRAFTERS = [
    SpeculativeConfig(policy="fixed", method="ngram", num_speculative_tokens=4),
    SpeculativeConfig(
        policy="fixed", method="ngram", num_speculative_tokens=1, prompt_lookup_max=2
    ),
    SpeculativeConfig(policy="fixed", method="tree", num_speculative_tokens=8, max_tree_width=3),
    SpeculativeConfig(policy="fixed", method="recycle", num_speculative_tokens=6),
    SpeculativeConfig(
        policy="fixed", method="recycle", num_speculative_tokens=4, recycle_scope="request"
    ),
    SpeculativeConfig(
        policy="fixed", method="recycle", num_speculative_tokens=4, recycle_scope="layered"
    ),
    SpeculativeConfig(policy="fixed", method="suffix", num_speculative_tokens=8),
    SpeculativeConfig(policy="fixed", method="auto", num_speculative_tokens=8),
]
DRAFTER_IDS = [
    "ngram-k4",
    "ngram-k1",
    "tree-8x3",
    "recycle-6",
    "recycle-request-4",
    "recycle-layered-4",
    "suffix-8",
    "auto-8",
]


def make_engine(
    model: str | Path,
    spec: SpeculativeConfig | None = None,
    dtype: str = "float64",
    num_blocks: int = 512,
    budget: int = 64,
    block_size: int = 8,
) -> OfflineEngine:
    return OfflineEngine(
        EngineConfig(
            model=ModelConfig(model=str(model), dtype=dtype),  # type: ignore[arg-type]
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
            speculative=spec or SpeculativeConfig(),
            separate_process=False,
        )
    )


def repetitive_token_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token prompts that repeat earlier spans (what prompt lookup feeds on) plus random ones."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        body = torch.randint(3, 300, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g)
        if i % 3 == 2:  # free-form: no repetition
            prompts.append(body.tolist())
        else:
            reps = 2 + i % 3
            prompts.append(body.repeat(reps).tolist()[: 12 + 9 * i % 70])
    return prompts


def tokens_of(results: list[Completion]) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.mark.parametrize("spec", DRAFTERS, ids=DRAFTER_IDS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_identity_on_tiny_models(
    spec: SpeculativeConfig, arch: str, tiny_model_dirs: dict[str, Path]
) -> None:
    check_greedy_identity(tiny_model_dirs[arch], spec)


@pytest.mark.parametrize("method", ["draft_model", "synthetic"])
def test_greedy_identity_with_model_drafters(
    method: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.spec_decode.test_draft_model import noisy_copy

    if method == "draft_model":
        draft = noisy_copy(tiny_llama_dir, tmp_path_factory.mktemp("draft") / "d", 0.05)
        spec = SpeculativeConfig(
            policy="fixed", method="draft_model", model=str(draft), num_speculative_tokens=4
        )
    else:
        spec = SpeculativeConfig(
            policy="fixed", method="synthetic", num_speculative_tokens=4, acceptance_rate=0.6
        )
    check_greedy_identity(tiny_llama_dir, spec)


def check_greedy_identity(model_dir: Path, spec: SpeculativeConfig) -> None:
    """32 concurrent prompts, repetitive and free-form, against no speculation."""
    prompts = repetitive_token_prompts(32)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = make_engine(model_dir).generate(prompts, params)
    engine = make_engine(model_dir, spec)
    speculative = engine.generate(prompts, params)
    assert tokens_of(speculative) == tokens_of(plain)
    stats = engine.core.stats()
    assert stats.num_draft_tokens > 0, "the prompts were meant to give the drafter matches"
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_blocks_used == 0


def test_greedy_identity_with_preemption_forced(tiny_llama_dir: Path) -> None:
    prompts = repetitive_token_prompts(16, seed=3)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    plain = make_engine(tiny_llama_dir).generate(prompts, params)
    spec = SpeculativeConfig(policy="fixed", method="tree", num_speculative_tokens=6)
    engine = make_engine(tiny_llama_dir, spec, num_blocks=24)
    speculative = engine.generate(prompts, params)
    stats = engine.core.stats()
    assert stats.num_preemptions > 0 and stats.num_draft_tokens > 0
    assert tokens_of(speculative) == tokens_of(plain)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13])
def test_max_tokens_and_stop_tokens_inside_an_accepted_run(
    max_tokens: int, tiny_llama_dir: Path
) -> None:
    prompts = repetitive_token_prompts(6, seed=5)
    plain_params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    plain = make_engine(tiny_llama_dir).generate(prompts, plain_params)
    spec = SpeculativeConfig(policy="fixed", method="ngram", num_speculative_tokens=6)
    got = make_engine(tiny_llama_dir, spec).generate(prompts, plain_params)
    assert tokens_of(got) == tokens_of(plain)
    # A stop token id that plain decoding meets mid-way must cut the speculative run there too.
    for p, ref in zip(prompts, plain, strict=True):
        stop = ref.token_ids[-1]
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,)
        )
        (a,) = make_engine(tiny_llama_dir).generate([p], params)
        (b,) = make_engine(tiny_llama_dir, spec).generate([p], params)
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason


def test_greedy_identity_with_logit_bias(tiny_llama_dir: Path) -> None:
    """Greedy verification takes the argmax of the *processed* logits: a bias that changes the
    greedy token must change the accepted one too. (Penalties turn speculation off.)"""
    prompts = repetitive_token_prompts(8, seed=13)
    plain_params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    params = SamplingParams(
        max_tokens=32,
        temperature=0.0,
        ignore_eos=True,
        logit_bias={prompts[0][-1]: 5.0, 7: -100.0},
    )
    plain = make_engine(tiny_llama_dir).generate(prompts, params)
    spec = SpeculativeConfig(policy="fixed", method="tree", num_speculative_tokens=6)
    engine = make_engine(tiny_llama_dir, spec)
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(plain)
    assert engine.core.stats().num_accepted_tokens > 0
    unprocessed = make_engine(tiny_llama_dir).generate(prompts, plain_params)
    assert tokens_of(unprocessed) != tokens_of(plain), "the bias was meant to matter"


def test_logprobs_under_speculation_are_the_targets(tiny_llama_dir: Path) -> None:
    prompts = repetitive_token_prompts(4, seed=7)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
    plain = make_engine(tiny_llama_dir).generate(prompts, params)
    spec = SpeculativeConfig(policy="fixed", method="tree", num_speculative_tokens=6)
    engine = make_engine(tiny_llama_dir, spec)
    got = engine.generate(prompts, params)
    assert engine.core.stats().num_accepted_tokens > 0
    for a, b in zip(plain, got, strict=True):
        assert a.token_ids == b.token_ids
        assert len(b.logprobs) == len(b.token_ids)
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.token_id == lb.token_id
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-9)
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]


def test_seeded_sampling_under_speculation_is_reproducible(tiny_llama_dir: Path) -> None:
    prompts = repetitive_token_prompts(6, seed=9)
    params = [
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=40 + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    spec = SpeculativeConfig(policy="fixed", method="tree", num_speculative_tokens=6)
    together = make_engine(tiny_llama_dir, spec).generate(prompts, params)
    engine = make_engine(tiny_llama_dir, spec)
    alone = [engine.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    assert tokens_of(together) == tokens_of(alone)


def test_per_request_cap_disables_speculation(tiny_llama_dir: Path) -> None:
    prompts = repetitive_token_prompts(3, seed=11)
    engine = make_engine(
        tiny_llama_dir, SpeculativeConfig(policy="fixed", method="ngram", num_speculative_tokens=4)
    )
    off = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, max_speculative_tokens=0)
    engine.generate(prompts, off)
    assert engine.core.stats().num_draft_tokens == 0
    on = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, on)
    assert engine.core.stats().num_draft_tokens > 0


def test_cache_after_compaction_equals_plain_decoding(tiny_llama_dir: Path) -> None:
    """The K/V a tree-speculative run leaves for its accepted tokens is the K/V plain decoding
    writes for the same tokens (positions 0 .. num_computed - 1)."""
    (prompt,) = repetitive_token_prompts(1, seed=13)
    # Long enough that neither run finishes (and frees its blocks) within its steps.
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    def cache_after_steps(spec: SpeculativeConfig | None, steps: int) -> tuple[torch.Tensor, int]:
        engine = make_engine(tiny_llama_dir, spec)
        core = engine.core
        core.add_request("r", prompt, params)
        for _ in range(steps):
            core.step()
        request = core.scheduler.requests["r"]
        bs = core.runner.block_size
        slots = [
            request.block_ids[p // bs] * bs + p % bs for p in range(request.num_computed_tokens)
        ]
        kv = core.runner.kv_cache
        flat = kv.view(kv.shape[0], 2, -1, *kv.shape[-2:])
        return flat[:, :, torch.tensor(slots)].clone(), request.num_computed_tokens

    spec = SpeculativeConfig(
        policy="fixed", method="tree", num_speculative_tokens=8, max_tree_width=4
    )
    spec_kv, n_spec = cache_after_steps(spec, steps=8)
    plain_kv, n_plain = cache_after_steps(None, steps=40)
    assert n_spec > 8, "speculation should have accepted drafts in 8 steps"
    n = min(n_spec, n_plain)
    torch.testing.assert_close(spec_kv[:, :, :n], plain_kv[:, :, :n], rtol=0, atol=1e-12)


def load_prompts(name: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in (DATASETS / name).read_text().splitlines() if line]
    return [r["prompt"] for r in rows[:n]]


EMBEDDED_PARAMS = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def embedded_identity_case() -> tuple[list[list[int]], list[list[int]]]:
    """The identity tests' 32 prompts on the embedded model (code edits, reformatting,
    quoting summaries, extraction + free-form chat) and plain greedy decoding's outputs."""
    prompts_text = load_prompts("repetitive.jsonl", 20) + load_prompts("chat.jsonl", 12)
    base = make_engine("smollm2-135m-instruct", dtype="float32", block_size=16, budget=512)
    prompts = encode_chat(base, prompts_text)
    return prompts, tokens_of(base.generate(prompts, EMBEDDED_PARAMS))


@pytest.mark.slow
def test_greedy_identity_on_the_embedded_model(
    embedded_identity_case: tuple[list[list[int]], list[list[int]]],
) -> None:
    prompts, plain = embedded_identity_case
    params = EMBEDDED_PARAMS
    for spec in (DRAFTERS[0], DRAFTERS[2]):
        engine = make_engine(
            "smollm2-135m-instruct", spec, dtype="float32", block_size=16, budget=512
        )
        assert tokens_of(engine.generate(prompts, params)) == plain, spec.method
        assert engine.core.stats().num_accepted_tokens > 0


@pytest.mark.slow
def test_training_free_drafters_on_the_embedded_model_with_preemption_forced(
    embedded_identity_case: tuple[list[list[int]], list[list[int]]],
) -> None:
    """recycle, suffix and auto over the same 32 prompts, on a KV cache too small for the
    batch: requests are preempted and recomputed mid-draft, and the outputs still match."""
    prompts, plain = embedded_identity_case
    params = EMBEDDED_PARAMS
    # Every request fits 96 blocks of 16 alone (so it can always finish); the batch does not
    # (num_preemptions > 0 below).
    assert max(len(p) for p in prompts) + 32 < 96 * 16
    for method in ("recycle", "suffix", "auto"):
        spec = SpeculativeConfig(policy="fixed", method=method, num_speculative_tokens=6)
        engine = make_engine(
            "smollm2-135m-instruct", spec, dtype="float32", block_size=16, budget=512,
            num_blocks=96,
        )  # fmt: skip
        assert tokens_of(engine.generate(prompts, params)) == plain, method
        stats = engine.core.stats()
        assert stats.num_preemptions > 0, method
        assert stats.num_accepted_tokens > 0, method
        assert stats.num_blocks_used == 0, method


@pytest.mark.slow
def test_model_drafters_on_the_embedded_model() -> None:
    """draft_model with draft = target accepts every greedy draft; synthetic keeps outputs.

    12 prompts: each draft token costs a forward of the full model here, on CPU.
    """
    texts = load_prompts("repetitive.jsonl", 6) + load_prompts("chat.jsonl", 6)
    base = make_engine("smollm2-135m-instruct", dtype="float32", block_size=16, budget=512)
    prompts = encode_chat(base, texts)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    plain = tokens_of(base.generate(prompts, params))
    del base
    specs = [
        SpeculativeConfig(policy="fixed", method="draft_model", model="smollm2-135m-instruct",
                          num_speculative_tokens=3),
        SpeculativeConfig(policy="fixed", method="synthetic", num_speculative_tokens=3,
                          acceptance_rate=0.5),
    ]  # fmt: skip
    for spec in specs:
        engine = make_engine(
            "smollm2-135m-instruct", spec, dtype="float32", block_size=16, budget=512
        )
        assert tokens_of(engine.generate(prompts, params)) == plain, spec.method
        stats = engine.core.stats()
        if spec.method == "draft_model":
            assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
        else:
            assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def encode_chat(engine: OfflineEngine, texts: list[str]) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for t in texts
    ]
