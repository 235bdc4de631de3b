"""Per-rate prompt prefixes: no run's prompts start like another run's (so no prefix-cache
block can match across runs), warm-up included, and prompt lengths barely change."""

from __future__ import annotations

from itertools import combinations

import pytest

from loadtest.client import ApiConfig, build_payload
from loadtest.data import load_samples
from loadtest.records import Sample
from loadtest.tokens import ApproxCounter
from loadtest.uniqueness import run_prefixes, warmup_prefixes, with_prefixes
from tests.tiny_models import make_tokenizer

COUNTER = ApproxCounter()
N = 32


def _run(samples: list[Sample], rate_index: int, dataset: str, mode: str = "per_rate_prefix"):
    return with_prefixes(samples, run_prefixes(mode, len(samples), rate_index, dataset), COUNTER)


@pytest.mark.parametrize("dataset", ["mix", "repetitive", "chat", "random"])
def test_rates_share_no_leading_characters(dataset: str) -> None:
    base = load_samples(dataset, N, COUNTER, output_len=64, random_input_len=40)
    runs = [_run(base, r, dataset) for r in range(6)]
    heads = [{s.prompt[:16] for s in run} for run in runs]
    for a, b in combinations(range(len(runs)), 2):
        assert not heads[a] & heads[b], (a, b)
    assert all(len(h) == N for h in heads)  # no two requests of one run start alike either
    warm = with_prefixes(base[:2], warmup_prefixes("per_rate_prefix", 2), COUNTER)
    assert not {s.prompt[:16] for s in warm} & set().union(*heads)


def test_repeats_of_one_rate_differ_and_the_first_keeps_its_old_name() -> None:
    base = load_samples("mix", N, COUNTER)
    runs = [
        with_prefixes(base, run_prefixes("per_rate_prefix", N, rate, "mix", repeat), COUNTER)
        for rate in range(3)
        for repeat in range(3)
    ]
    heads = [{s.prompt[:16] for s in run} for run in runs]
    for a, b in combinations(range(len(runs)), 2):
        assert not heads[a] & heads[b], (a, b)
    assert run_prefixes("per_rate_prefix", 2, 1, "mix", 0) == run_prefixes(
        "per_rate_prefix", 2, 1, "mix"
    )
    assert run_prefixes("per_rate_prefix", 1, 1, "mix", 2) == ["[run r1.2-0 mix] "]


def test_datasets_of_one_server_differ_too() -> None:
    mix = _run(load_samples("mix", N, COUNTER), 0, "mix")
    rep = _run(load_samples("repetitive", N, COUNTER), 0, "repetitive")
    assert not {s.prompt[:16] for s in mix} & {s.prompt[:16] for s in rep}


def test_first_cache_block_differs_under_a_real_tokenizer() -> None:
    """A prefix cache matches whole 16-token blocks chained from the first: a different first
    block means no block of the request can be a hit."""
    tok = make_tokenizer()
    base = load_samples("chat", N, COUNTER)
    blocks = [
        {tuple(tok(s.prompt).input_ids[:16]) for s in _run(base, r, "chat")} for r in range(3)
    ]
    for a, b in combinations(blocks, 2):
        assert not a & b
    plain = {tuple(tok(s.prompt).input_ids[:16]) for s in base}
    assert not plain & blocks[0]


def test_token_counts_stay_close() -> None:
    base = load_samples("mix", N, COUNTER, output_len=64)
    for r in (0, 5, 12):
        for old, new in zip(base, _run(base, r, "repetitive"), strict=True):
            assert new.prompt.endswith(old.prompt)
            assert 0 < new.prompt_len - old.prompt_len <= 12
            assert new.prompt_len == COUNTER.count(new.prompt)
            assert (new.output_len, new.category) == (old.output_len, old.category)


def test_chat_prefix_opens_the_first_message() -> None:
    (s,) = _run([Sample("Why is the sky blue?", 5, 8)], 2, "chat")
    body = build_payload(ApiConfig("http://x", "/v1/chat/completions", "m"), s)
    assert body["messages"] == [{"role": "user", "content": "[run r2-0 chat] Why is the sky blue?"}]


def test_none_keeps_prompts() -> None:
    base = load_samples("mix", N, COUNTER)
    assert _run(base, 3, "mix", mode="none") == base
    assert warmup_prefixes("none", 2) == ["", ""]
    with pytest.raises(ValueError, match="prompt_uniqueness"):
        run_prefixes("per_request", 2, 0, "mix")
    with pytest.raises(ValueError, match="prefixes"):
        with_prefixes(base, ["a"], COUNTER)
