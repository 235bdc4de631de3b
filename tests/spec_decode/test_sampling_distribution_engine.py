"""Sampled requests keep the target distribution through the whole engine.

The same prompt is sampled thousands of times (temperature 1, top_k 4: a small support, so
the empirical total variation has a low noise floor) without speculation and with a chain of
deterministic drafts (synthetic), a chain of sampled drafts verified against their draft
distribution (draft_model), and the deterministic trees of the training-free drafters:
recycle (the target's own recorded top-k), suffix (what earlier requests with the same prompt
produced, from the cross-request cache) and auto (both, with n-gram). The n-gram and
suffix-tree drafters alone can't be checked this way: a random tiny model does not copy from
its context, so their drafts are never accepted; the tree rules are checked statistically on
the verification functions themselves (test_verify_statistics.py).
Token 1 comes from the prefill; tokens 2 and 3 come from verify steps, so their joint
distribution must match plain decoding's. The noise floor is measured in the same test (plain
decoding against itself with other seeds), so the bound tracks the sample size.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from server.config import SpeculativeConfig
from server.engine.sampling_params import SamplingParams
from tests.spec_decode.test_draft_model import noisy_copy
from tests.spec_decode.test_engine_speculation import make_engine

N = 3000


PROMPT = list(range(40, 52)) * 2


def sample(
    model: Path, prompt: list[int], spec: SpeculativeConfig | None, seed0: int
) -> tuple[list[tuple], int]:
    engine = make_engine(model, spec)
    params = [
        SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=seed0 + i, ignore_eos=True)
        for i in range(N)
    ]
    results = engine.generate([prompt] * N, params)
    # Tokens 2 and 3: the ones verify steps produce.
    return [tuple(r.token_ids[1:]) for r in results], engine.core.stats().num_accepted_tokens


def total_variation(a: list[tuple], b: list[tuple]) -> float:
    ca, cb = collections.Counter(a), collections.Counter(b)
    return 0.5 * sum(abs(ca[k] - cb[k]) for k in ca.keys() | cb.keys()) / N


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return PROMPT


@pytest.fixture(scope="module")
def plain(tiny_llama_dir: Path, prompt: list[int]) -> tuple[list[tuple], float]:
    reference, _ = sample(tiny_llama_dir, prompt, None, seed0=0)
    again, _ = sample(tiny_llama_dir, prompt, None, seed0=10**6)
    return reference, total_variation(reference, again)


@pytest.mark.parametrize("method", ["synthetic", "draft_model", "recycle", "suffix", "auto"])
def test_sampled_outputs_follow_the_target_distribution(
    method: str,
    prompt: list[int],
    plain: tuple[list[tuple], float],
    tiny_llama_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    reference, noise = plain
    if method == "draft_model":
        draft = noisy_copy(tiny_llama_dir, tmp_path_factory.mktemp("d") / "draft", 0.05)
        spec = SpeculativeConfig(
            policy="fixed", method="draft_model", model=str(draft), num_speculative_tokens=3
        )
    elif method == "synthetic":
        spec = SpeculativeConfig(
            policy="fixed", method="synthetic", num_speculative_tokens=3, acceptance_rate=0.7
        )
    else:
        # Deterministic trees verified by the multi-draft rule. recycle drafts the target's
        # own recorded top-k; suffix drafts what earlier requests of the same prompt sampled.
        # Shared recycle tables: one request's top-k drafts the next (3 tokens each is too
        # short for a request's own table to learn).
        spec = SpeculativeConfig(
            policy="fixed", method=method, num_speculative_tokens=4, recycle_scope="shared"
        )
    samples, accepted = sample(tiny_llama_dir, prompt, spec, seed0=2 * 10**6)
    assert accepted > N // 4, "too few accepted drafts for the check to mean anything"
    tv = total_variation(reference, samples)
    # Two empirical samples of the same distribution differ by about `noise`; a biased rule
    # shifts the joint by far more (tests/spec_decode/test_verify_statistics.py measures 0.16-0.27).
    assert tv < max(2 * noise, 0.04), f"TV {tv:.3f} vs noise floor {noise:.3f}"
