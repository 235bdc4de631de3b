"""The embedded SmolLM2 (a Q4_1 GGUF) is served as int4 by default on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model.int4 import Int4Linear
from server.model.int4_head import RescoredInt4Head
from server.model.quantize import QUANT_FILE, int4_dir

pytestmark = pytest.mark.slow


def test_embedded_model_auto_is_int4_repacked_exactly() -> None:
    from server.model.loader import resolve_model

    try:
        path = resolve_model("smollm2")  # the fp32 conversion other slow tests share
    except ValueError as e:
        pytest.skip(str(e))
    engine = OfflineEngine(
        EngineConfig(
            model=ModelConfig(model="smollm2-135m-instruct", device="cpu"),  # auto, auto
            cache=CacheConfig(block_size=16, num_blocks=64),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256),
            separate_process=False,
        )
    )
    model = engine.core.runner.model
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 30 * 4 + 1
    summary = json.loads((int4_dir(path) / QUANT_FILE).read_text())
    # Every Q4_1 linear of the file, and its Q8_0 embedding as the tied head, dequantises to
    # transformers' weights (checked while building); the lookup keeps the dense table.
    assert summary["repacked_exact"] == 211 and summary["round_to_nearest"] == 0
    assert isinstance(model.lm_head, RescoredInt4Head) and model.lm_head.planes == 2
    assert isinstance(model.model.embed_tokens.weight, torch.nn.Parameter)
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = tok.encode(text, add_special_tokens=False)
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    text = tok.decode(out[0].token_ids)
    assert out[0].token_ids and "Paris" in text, text


def test_speculation_under_int4_is_bitwise_plain_decoding_on_the_embedded_model() -> None:
    """int4's linears round their inputs to bfloat16, which turns last-bit differences
    between a k-row verify and a one-row decode into different greedy tokens at near-ties;
    verify rows are therefore attended as plain decoding attends them (attention.py). Trees
    and chains over 16 mix prompts at batch 8 must give exactly plain int4 decoding's tokens
    (they did not, before: loadtest/results/spec/2026-12-03-drafters-before-verify-fix.md)."""
    from loadtest.bench_spec import DATASET_FILES, encode_chat, load_prompts, make_engine
    from server.config import SpeculativeConfig
    from server.model.loader import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    plain = make_engine(model_dir, SpeculativeConfig(), "int4")
    prompts = encode_chat(plain, load_prompts(DATASET_FILES["mix"], 16))
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    reference = [r.token_ids for r in plain.generate(prompts, params)]
    del plain
    for method in ("ngram", "auto"):
        spec = SpeculativeConfig(method=method, num_speculative_tokens=8, policy="fixed")
        engine = make_engine(model_dir, spec, "int4")
        got = []
        for i in range(0, len(prompts), 8):
            got += [r.token_ids for r in engine.generate(prompts[i : i + 8], params)]
        assert got == reference, method
        assert engine.core.stats().num_accepted_tokens > 0
