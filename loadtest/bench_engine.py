"""Offline engine throughput on the embedded model, and single-stream decode vs transformers.

    python -m loadtest.bench_engine [--model smollm2-135m-instruct] [--batch-sizes 1 8 32]
        [--new-tokens 128] [--out loadtest/results/engine]

Everything is measured in one run on one machine: the engine's output tokens/s at each batch
size (all prompts submitted at once, ignore_eos, greedy), and single-stream decode tokens/s of
the engine against transformers' ``generate`` on the same weights (a ratio). Writes a JSON file
and a markdown table named by date, with the command, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from loadtest import report
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model.loader import resolve_model

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
    "List ten fruits and describe the taste of each in one sentence.",
    "What are the main causes of the French Revolution?",
    "Translate 'good morning, how are you today?' into French, Spanish and German.",
    "Give me a recipe for pancakes with step by step instructions.",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "Why is the sky blue? Answer for a ten year old.",
]


def machine_info() -> dict[str, str]:
    """The host as the sweep reports describe it (loadtest.report), plus what offline
    benchmarks add: torch's version and threads, and the time of the run."""
    host = report.machine_info()
    git = report.git_info()
    return {
        "cpu": str(host["cpu_model"]),
        "cores": str(host["usable_cores"]),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": str(host["python"]),
        "git_commit": git["commit"][:7] + (" (dirty)" if git["dirty"] == "yes" else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def chat_prompts(tokenizer: object, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    return out


def engine_throughput(engine: OfflineEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    return {
        "batch": len(prompts),
        "seconds": round(elapsed, 3),
        "output_tokens": generated,
        "output_tokens_per_s": round(generated / elapsed, 2),
    }


def single_stream(engine: OfflineEngine, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s of one request (prefill excluded: TPOT-based)."""
    rates = []
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(repeats):
        start = time.perf_counter()
        ttft_params = replace(params, max_tokens=1)
        engine.generate([prompt], ttft_params)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        engine.generate([prompt], params)
        total = time.perf_counter() - start
        rates.append((new_tokens - 1) / max(total - prefill, 1e-9))
    return statistics.median(rates)


def transformers_single_stream(
    model_dir: Path, prompt: list[int], new_tokens: int, repeats: int
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            total = time.perf_counter() - start
            produced = out.shape[1] - ids.shape[1]
            rates.append((produced - 1) / max(total - prefill, 1e-9))
    return statistics.median(rates)


def write_report(out_dir: Path, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# Engine throughput, {m['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, commit {m['git_commit']}.",
        f"Model: {result['model']} (float32), {result['new_tokens']} new tokens per request, "
        "greedy, ignore_eos, all requests submitted at once.",
        "",
        "| batch | output tokens | seconds | output tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["throughput"]:
        lines.append(
            f"| {row['batch']} | {row['output_tokens']} | {row['seconds']} | "
            f"{row['output_tokens_per_s']} |"
        )
    s = result["single_stream"]
    lines += [
        "",
        f"Single-stream decode (median of {s['repeats']}, prefill excluded): specd "
        f"{s['specd_tokens_per_s']:.1f} tok/s, transformers generate "
        f"{s['transformers_tokens_per_s']:.1f} tok/s, ratio **{s['ratio']:.2f}x**.",
        "",
    ]
    path = out_dir / f"{stamp}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)

    model_dir = resolve_model(args.model)
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),
        # Off: every measurement computes its prompts (no reuse across repeats).
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=args.max_num_batched_tokens
        ),
        separate_process=False,
    )
    engine = OfflineEngine(config)
    throughput = []
    for batch in args.batch_sizes:
        row = engine_throughput(engine, chat_prompts(engine.tokenizer, batch), args.new_tokens)
        print(f"batch {batch}: {row['output_tokens_per_s']} output tok/s", flush=True)
        throughput.append(row)
    prompt = chat_prompts(engine.tokenizer, 1)[0]
    ours = single_stream(engine, prompt, args.new_tokens, args.repeats)
    del engine
    theirs = transformers_single_stream(model_dir, prompt, args.new_tokens, args.repeats)
    print(f"single stream: specd {ours:.1f} tok/s, transformers {theirs:.1f} tok/s", flush=True)
    result = {
        "command": "python -m loadtest.bench_engine " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "model": args.model,
        "new_tokens": args.new_tokens,
        "throughput": throughput,
        "single_stream": {
            "repeats": args.repeats,
            "specd_tokens_per_s": ours,
            "transformers_tokens_per_s": theirs,
            "ratio": ours / theirs,
        },
    }
    print(f"wrote {write_report(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
