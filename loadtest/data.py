"""Prompt sets. Shipped under loadtest/datasets/ (JSONL, one {"prompt", "category"} a line):

repetitive  code edits, JSON -> YAML, quoting summaries, field extraction: the output copies
            long spans of the prompt, so n-gram prompt lookup drafts well
chat        open questions: the output copies little, so drafts are mostly rejected
mix         both, interleaved at random
random      prompts of a given token length built from datasets/words.txt
sharegpt    a ShareGPT JSON file (--dataset-path): the first human turn of each conversation
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loadtest.records import Sample
from loadtest.tokens import TokenCounter

DATASET_DIR = Path(__file__).parent / "datasets"
DATASET_NAMES = ("repetitive", "chat", "mix", "random", "sharegpt")
DEFAULT_OUTPUT_LEN = 128


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'prompt'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _take(rows: Sequence[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """`n` rows: a seeded shuffle, cycled (re-shuffled each pass) when n > len(rows)."""
    out: list[dict] = []
    while len(out) < n:
        out.extend(rows[i] for i in rng.permutation(len(rows)))
    return out[:n]


def _to_samples(rows: list[dict], counter: TokenCounter, output_len: int | None) -> list[Sample]:
    return [
        Sample(
            prompt=r["prompt"],
            prompt_len=counter.count(r["prompt"]),
            output_len=output_len or int(r.get("output_len", DEFAULT_OUTPUT_LEN)),
            category=str(r.get("category", "")),
        )
        for r in rows
    ]


def random_prompt(
    num_tokens: int, counter: TokenCounter, rng: np.random.Generator, words: Sequence[str]
) -> str:
    """Words drawn at random until `counter` says the text is `num_tokens` long (within the
    last word). Common English words are ~1 token each, so the first guess is close."""
    picked = [words[i] for i in rng.integers(0, len(words), size=max(num_tokens, 1))]
    text = " ".join(picked)
    while counter.count(text) > num_tokens and len(picked) > 1:
        picked.pop()
        text = " ".join(picked)
    while counter.count(text) < num_tokens:
        picked.append(words[int(rng.integers(0, len(words)))])
        text = " ".join(picked)
    return text


def _random_samples(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    counter: TokenCounter,
    rng: np.random.Generator,
) -> list[Sample]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    words = (DATASET_DIR / "words.txt").read_text().split()
    lo_in, hi_in = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    lo_out, hi_out = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
    samples = []
    for _ in range(n):
        n_in = max(1, int(rng.integers(lo_in, hi_in + 1)))
        text = random_prompt(n_in, counter, rng, words)
        n_out = max(1, int(rng.integers(lo_out, hi_out + 1)))
        samples.append(Sample(text, counter.count(text), n_out, "random"))
    return samples


def _sharegpt_samples(
    path: Path, n: int, output_len: int | None, counter: TokenCounter, rng: np.random.Generator
) -> list[Sample]:
    """vLLM's ShareGPT sampling: first human turn as the prompt, the reply's length as the
    output length (unless given); drop pairs shorter than 4 tokens or longer than 1024/2048."""
    data = json.loads(path.read_text(encoding="utf-8"))
    convs = [
        d["conversations"]
        for d in data
        if isinstance(d, dict) and len(d.get("conversations") or []) >= 2
    ]
    samples: list[Sample] = []
    for i in rng.permutation(len(convs)):
        turns = convs[i]
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        p_len = counter.count(prompt)
        o_len = output_len or counter.count(reply)
        if p_len < 4 or (output_len is None and o_len < 4):
            continue
        if p_len > 1024 or p_len + o_len > 2048:
            continue
        samples.append(Sample(prompt, p_len, o_len, "sharegpt"))
        if len(samples) == n:
            break
    if len(samples) < n:
        samples = [samples[i % len(samples)] for i in range(n)] if samples else []
    if not samples:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return samples


def load_samples(
    name: str,
    num_prompts: int,
    counter: TokenCounter,
    *,
    seed: int = 0,
    output_len: int | None = None,
    dataset_path: str | None = None,
    random_input_len: int = 1024,
    random_output_len: int = DEFAULT_OUTPUT_LEN,
    random_range_ratio: float = 0.0,
) -> list[Sample]:
    """`num_prompts` samples of dataset `name`; `output_len` (--max-tokens) overrides the
    dataset's own output lengths."""
    rng = np.random.default_rng(seed)
    if name not in DATASET_NAMES:
        raise ValueError(f"--dataset-name must be one of {DATASET_NAMES}, got {name!r}")
    if name == "random":
        return _random_samples(
            num_prompts,
            random_input_len,
            output_len or random_output_len,
            random_range_ratio,
            counter,
            rng,
        )
    if name == "sharegpt":
        if not dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return _sharegpt_samples(Path(dataset_path), num_prompts, output_len, counter, rng)
    if dataset_path:
        rows = load_jsonl(Path(dataset_path))
    elif name == "mix":
        rows = load_jsonl(DATASET_DIR / "repetitive.jsonl") + load_jsonl(DATASET_DIR / "chat.jsonl")
    else:
        rows = load_jsonl(DATASET_DIR / f"{name}.jsonl")
    return _to_samples(_take(rows, num_prompts, rng), counter, output_len)
