"""Prompts the server has not seen, for every run of a sweep.

A sweep keeps one server up for all its rates (and datasets). Replaying the same prompts at
each rate would let the prefix cache serve them from the second rate on: a peer's sweep
computed 1 prompt token per request there and TTFT fell 10x. The shipped sets are too small
(~35 prompts) to give every rate a disjoint slice, so `per_rate_prefix` starts every prompt
with a short line naming its run and request, e.g. "[run r2-17 mix] ". It sits at the very
start of the prompt (for the chat endpoint: of the first user message's content), so the
first cache block of every request differs and no block of an earlier run can match: a
prefix cache chains block hashes, so a block matches only when every block before it does.

What stays shared: a chat template's own header before the message (e.g. a default system
prompt) is the same for every request, so its full blocks may still hit the cache. That is
what a real deployment sees too.
"""

from __future__ import annotations

from dataclasses import replace

from loadtest.records import Sample
from loadtest.tokens import TokenCounter

PROMPT_UNIQUENESS = ("per_rate_prefix", "none")
DEFAULT_PROMPT_UNIQUENESS = "per_rate_prefix"


def check_mode(mode: str) -> str:
    if mode not in PROMPT_UNIQUENESS:
        raise ValueError(f"prompt_uniqueness must be one of {PROMPT_UNIQUENESS}, got {mode!r}")
    return mode


def run_prefixes(mode: str, n: int, rate_index: int, dataset: str, repeat: int = 0) -> list[str]:
    """The prefix of each of a run's `n` prompts. The rate index (and the repeat, from the
    second on) comes first so that prompts of different runs differ within their first
    characters (and first tokens)."""
    if check_mode(mode) == "none":
        return [""] * n
    run = f"r{rate_index}" if repeat == 0 else f"r{rate_index}.{repeat}"
    return [f"[run {run}-{i} {dataset}] " for i in range(n)]


def warmup_prefixes(mode: str, n: int) -> list[str]:
    """Warm-up prompts get their own prefix: they must not cache anything a measured run
    then hits."""
    if check_mode(mode) == "none":
        return [""] * n
    return [f"[warm-up {i}] " for i in range(n)]


def with_prefixes(
    samples: list[Sample], prefixes: list[str], counter: TokenCounter
) -> list[Sample]:
    """`samples` with each prompt prefixed; prompt_len recounted (a tokenizer may merge
    across the seam, so the count is not simply the sum)."""
    if len(prefixes) != len(samples):
        raise ValueError(f"{len(prefixes)} prefixes for {len(samples)} samples")
    return [
        s if not p else replace(s, prompt=p + s.prompt, prompt_len=counter.count(p + s.prompt))
        for s, p in zip(samples, prefixes, strict=True)
    ]
