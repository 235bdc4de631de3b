"""ModelRunner.execute end to end against transformers, for every tiny architecture."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model.harness import MiniScheduler, hf_greedy, make_request, make_runner
from tests.tiny_models import TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    return arch, make_tiny_model(arch, tmp_path_factory.mktemp(arch) / "model", seed=1)


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def test_greedy_batched_chunked_matches_transformers(tiny):
    """Several requests, prompts chunked across steps, 40 decode steps: token-for-token equal.

    float64 on both sides: the comparison is about paging/chunking/batching, not about which
    side wins an fp32 near-tie.
    """
    _, path = tiny
    runner = make_runner(path, dtype="float64", block_size=4)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    prompts = _prompts(runner.vocab_size, [5, 23, 41, 1])
    sched = MiniScheduler(runner, token_budget=16)
    reqs = [make_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    outs = sched.run(max_new=40)
    assert max(len(o.sampled_token_ids) for o in outs) == 4  # decodes do batch together
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_token_ids == hf_greedy(ref, p, 40), r.request_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_on_cuda_matches_transformers(tiny):
    """The same on CUDA (batched-decode attention mode), float64 on both sides."""
    _, path = tiny
    runner = make_runner(path, dtype="float64", block_size=4, device="cuda")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).cuda().eval()
    prompts = _prompts(runner.vocab_size, [5, 23, 41, 1])
    sched = MiniScheduler(runner, token_budget=16)
    reqs = [make_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    sched.run(max_new=40)
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_token_ids == hf_greedy(ref, p, 40), r.request_id


def test_fp32_logits_match_transformers(tiny):
    """Our fp32 forward through a paged cache (two chunks) vs transformers' logits."""
    _, path = tiny
    runner = make_runner(path, dtype="float32", block_size=8)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = _prompts(runner.vocab_size, [30])[0]
    r = make_request("a", prompt, prompt_logprobs=0)
    sched = MiniScheduler(runner, token_budget=17)
    sched.add(r)
    first, second = sched.step(), sched.step()
    ours = [lp.logprob for lp in first.prompt_logprobs["a"] + second.prompt_logprobs["a"]]
    with torch.inference_mode():
        logp = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    theirs = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert len(ours) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4
    assert second.sampled_token_ids["a"] == [int(logp[-1].argmax())]


def test_seeded_sampling_is_batch_independent(tiny):
    """A seeded request draws the same tokens alone or in a batch; generators are dropped."""
    _, path = tiny
    runner = make_runner(path, dtype="float32")
    prompt = _prompts(runner.vocab_size, [9])[0]

    def run(batch_with_other: bool) -> list[int]:
        sched = MiniScheduler(runner, token_budget=64)
        r = make_request("s", prompt, temperature=1.0, seed=1234)
        sched.add(r)
        if batch_with_other:
            sched.add(make_request("o", prompt[::-1], temperature=1.0))
        sched.run(max_new=12)
        runner.execute(sched.plan())  # empty plan carrying finished ids
        return r.output_token_ids

    alone = run(False)
    assert "s" not in runner._generators
    assert run(True) == alone


def test_logprobs_returned_for_sampled_tokens(tiny):
    _, path = tiny
    runner = make_runner(path)
    r = make_request("l", _prompts(runner.vocab_size, [6])[0], logprobs=3)
    sched = MiniScheduler(runner, token_budget=64)
    sched.add(r)
    outs = sched.run(max_new=3)
    lps = [lp for o in outs for lp in o.logprobs.get("l", [])]
    assert [lp.token_id for lp in lps] == r.output_token_ids
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy: chosen = best
        assert math.isclose(lp.logprob, lp.top[0][1])


def test_huge_finite_logits_pass_and_a_nan_row_fails_its_request_alone(tiny, monkeypatch):
    """The non-finite check sums each row first: a sum that overflows (finite logits near
    float32's max) must not fail the request, and a NaN row fails only its own request."""
    _, path = tiny
    runner = make_runner(path)
    reqs = [make_request("huge", [5, 6, 7]), make_request("nan", [8, 9]), make_request("ok", [4])]
    real = runner.model.compute_logits

    def skewed(hidden: torch.Tensor) -> torch.Tensor:
        logits = real(hidden)
        logits[0, :4] = 3e38  # finite; the row's sum is inf
        logits[0, 7] = 3.4e38  # the greedy token
        logits[1, 2] = float("nan")
        return logits

    monkeypatch.setattr(runner.model, "compute_logits", skewed)
    sched = MiniScheduler(runner, token_budget=64)
    for r in reqs:
        sched.add(r)
    out = sched.step()
    assert out.failed.keys() == {"nan"}
    assert out.sampled_token_ids["huge"] == [7]
    assert "ok" in out.sampled_token_ids
