"""The embedded SmolLM2-135M-Instruct: our runner vs transformers, greedy, fp32."""

from __future__ import annotations

import time

import pytest
import torch

from tests.model.harness import MiniScheduler, hf_greedy, make_request, make_runner

pytestmark = pytest.mark.slow

MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paper clip.",
]


@pytest.fixture(scope="module")
def smollm2():
    from server.model.loader import resolve_model

    try:
        path = resolve_model("smollm2")
    except ValueError as e:  # package not installed: say so rather than fail obscurely
        pytest.skip(str(e))
    return path


def test_smollm2_greedy_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    runner = make_runner(smollm2, dtype="float32", block_size=16, num_blocks=64)
    load_s = time.perf_counter() - t0
    assert load_s < 30, f"loading the converted cache took {load_s:.1f} s"
    assert 2 in runner.eos_token_ids  # <|im_end|>
    assert runner.max_model_len == 8192 and runner.vocab_size == 49152
    tok = runner.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False
        )
        for m in MESSAGES
    ]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert prompts[0][:1] == [tok.convert_tokens_to_ids("<|im_start|>")]
    sched = MiniScheduler(runner, token_budget=32)
    reqs = [make_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    sched.run(max_new=40)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for r, p in zip(reqs, prompts, strict=True):
        ours, theirs = r.output_token_ids, hf_greedy(ref, p, 40)
        assert ours == theirs, (tok.decode(ours), tok.decode(theirs))
