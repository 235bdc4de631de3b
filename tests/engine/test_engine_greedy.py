"""The whole engine (scheduler + runner + sampler) against transformers' greedy generation.

Several prompts of different lengths run concurrently in one batch, with a token budget small
enough that prompts are cut into chunks and mixed with other requests' decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from tests.tiny_models import TINY_ARCHS

NEW_TOKENS = 64
PROMPT_LENGTHS = (3, 17, 40, 90)


def engine_for(model_dir: Path, dtype: str = "float64", **kw: object) -> OfflineEngine:
    cache = CacheConfig(block_size=8, num_blocks=kw.pop("num_blocks", 256))  # type: ignore[arg-type]
    return OfflineEngine(
        EngineConfig(
            model=ModelConfig(model=str(model_dir), dtype=dtype),  # type: ignore[arg-type]
            cache=cache,
            scheduler=SchedulerConfig(
                max_num_seqs=8,
                max_num_batched_tokens=kw.pop("budget", 24),  # type: ignore[arg-type]
            ),
            separate_process=False,
        )
    )


def random_prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids 0-2 are special tokens in the tiny tokenizer; prompts use ordinary tokens.
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def transformers_greedy(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(out[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_concurrent_chunked_batch_matches_transformers(
    arch: str, tiny_model_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_model_dirs[arch]
    engine = engine_for(model_dir)
    prompts = random_prompts(engine.core.info.vocab_size, PROMPT_LENGTHS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = engine.generate(prompts, params)
    # The budget (24) is smaller than the longer prompts: they were prefilled in chunks.
    assert max(PROMPT_LENGTHS) > 24
    expected = transformers_greedy(model_dir, prompts, NEW_TOKENS, torch.float64)
    for got, want in zip(results, expected, strict=True):
        assert got.finish_reason == "length"
        assert got.token_ids == want
    assert engine.core.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.slow
def test_embedded_smollm2_float32_matches_transformers() -> None:
    """The served model (float32) against transformers (float32) on the same weights."""
    engine = engine_for_embedded()
    tok = engine.tokenizer
    questions = [
        "What is the capital of France?",
        "Write a Python function that reverses a string.",
        "Give three tips for staying focused while studying for exams at home.",
    ]
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = engine.generate(prompts, params)
    expected = transformers_greedy(
        Path(engine.core.runner.model_path), prompts, NEW_TOKENS, torch.float32
    )
    for got, want in zip(results, expected, strict=True):
        assert got.token_ids == want


def engine_for_embedded() -> OfflineEngine:
    return OfflineEngine(
        EngineConfig(
            model=ModelConfig(model="smollm2-135m-instruct", dtype="float32"),
            cache=CacheConfig(block_size=16, num_blocks=128),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
            separate_process=False,
        )
    )
