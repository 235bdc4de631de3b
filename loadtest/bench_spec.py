"""Speculative decoding at fixed budgets against no speculation, on the embedded model.

    python -m loadtest.bench_spec [--budgets 1 2 4 8] [--methods ngram tree]
        [--batch-sizes 1 8] [--new-tokens 64] [--prompts 8] [--out loadtest/results/spec]

For each dataset (repetitive: code edits, reformatting, quoting summaries, extraction;
free-form chat), batch size and configuration it measures decode tokens/s (output tokens over
wall time of the whole batch, greedy), the acceptance rate (accepted / proposed draft tokens)
and the mean accepted length (tokens emitted per verify step = 1 + accepted / verify steps).
Batch 1 runs the prompts one after another; batch 8 submits 8 at once. Every configuration runs
in this one process on this one machine; outputs are checked identical to no speculation.
Writes JSON, a markdown table and a PNG plot named by date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.bench_engine import machine_info
from server.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model.loader import resolve_model

DATASETS = Path(__file__).parent / "datasets"


@dataclass
class Row:
    dataset: str
    batch: int
    method: str
    budget: int
    tokens_per_s: float
    output_tokens: int
    seconds: float
    acceptance_rate: float
    mean_accepted_length: float
    identical_to_plain: bool


def load_prompts(name: str, n: int) -> list[str]:
    rows = [json.loads(x) for x in (DATASETS / name).read_text().splitlines() if x.strip()]
    return [r["prompt"] for r in rows[:n]]


def encode_chat(engine: OfflineEngine, texts: list[str]) -> list[list[int]]:
    tok = engine.tokenizer
    out = []
    for t in texts:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        out.append(tok.encode(chat, add_special_tokens=False))
    return out


def make_engine(model_dir: Path, spec: SpeculativeConfig) -> OfflineEngine:
    return OfflineEngine(
        EngineConfig(
            model=ModelConfig(model=str(model_dir), dtype="float32"),
            # No prefix-cache reuse across repeats: every run computes its prompts.
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048),
            speculative=spec,
            separate_process=False,
        )
    )


def run_config(
    engine: OfflineEngine, prompts: list[list[int]], batch: int, new_tokens: int
) -> tuple[list[list[int]], float]:
    """Generates every prompt (in groups of `batch`); returns outputs and wall seconds."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += [r.token_ids for r in engine.generate(prompts[i : i + batch], params)]
    return outputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", nargs="+", default=["ngram", "tree"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per dataset")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/spec"))
    args = ap.parse_args(argv)

    model_dir = resolve_model(args.model)
    configs = [("none", 0, SpeculativeConfig())] + [
        (m, k, SpeculativeConfig(method=m, num_speculative_tokens=k))  # type: ignore[arg-type]
        for m in args.methods
        for k in args.budgets
    ]
    datasets = {"repetitive": "repetitive.jsonl", "free-form": "chat.jsonl"}
    rows: list[Row] = []
    plain_outputs: dict[tuple[str, int], list[list[int]]] = {}
    for method, budget, spec in configs:
        engine = make_engine(model_dir, spec)
        for dataset, file in datasets.items():
            prompts = encode_chat(engine, load_prompts(file, args.prompts))
            for batch in args.batch_sizes:
                before = engine.core.stats()
                outputs, seconds = run_config(engine, prompts, batch, args.new_tokens)
                after = engine.core.stats()
                drafts = after.num_drafts - before.num_drafts
                proposed = after.num_draft_tokens - before.num_draft_tokens
                accepted = after.num_accepted_tokens - before.num_accepted_tokens
                key = (dataset, batch)
                if method == "none":
                    plain_outputs[key] = outputs
                produced = sum(len(o) for o in outputs)
                row = Row(
                    dataset=dataset,
                    batch=batch,
                    method=method,
                    budget=budget,
                    tokens_per_s=round(produced / seconds, 2),
                    output_tokens=produced,
                    seconds=round(seconds, 2),
                    acceptance_rate=round(accepted / proposed, 3) if proposed else 0.0,
                    mean_accepted_length=round(1 + accepted / drafts, 3) if drafts else 1.0,
                    identical_to_plain=outputs == plain_outputs[key],
                )
                rows.append(row)
                print(
                    f"{dataset:10s} batch {batch} {method:5s} k={budget}: "
                    f"{row.tokens_per_s:7.1f} tok/s  acceptance {row.acceptance_rate:.2f}  "
                    f"mean accepted length {row.mean_accepted_length:.2f}  "
                    f"identical {row.identical_to_plain}",
                    flush=True,
                )
        del engine
    write_report(args, rows)
    return 0


def write_report(args: argparse.Namespace, rows: list[Row]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = machine_info()
    command = "python -m loadtest.bench_spec " + " ".join(sys.argv[1:])
    (out / f"{stamp}.json").write_text(
        json.dumps(
            {"command": command, "machine": machine, "rows": [r.__dict__ for r in rows]},
            indent=2,
        )
        + "\n"
    )
    plot = out / f"{stamp}.png"
    plot_rows(rows, plot)
    base = {(r.dataset, r.batch): r.tokens_per_s for r in rows if r.method == "none"}
    lines = [
        f"# Speculative decoding at fixed budgets, {machine['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"commit {machine['git_commit']}. Model: {args.model} (float32, CPU), "
        f"{args.prompts} prompts per dataset, {args.new_tokens} new tokens each, greedy.",
        "",
        f"![tokens/s by budget]({plot.name})",
        "",
        "| dataset | batch | method | budget | tok/s | speed-up | acceptance | mean accepted "
        "length | identical |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = r.tokens_per_s / base[(r.dataset, r.batch)]
        lines.append(
            f"| {r.dataset} | {r.batch} | {r.method} | {r.budget} | {r.tokens_per_s} | "
            f"{speedup:.2f}x | {r.acceptance_rate:.2f} | {r.mean_accepted_length:.2f} | "
            f"{'yes' if r.identical_to_plain else 'NO'} |"
        )
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stamp}.md'}")


def plot_rows(rows: list[Row], path: Path) -> None:
    keys = sorted({(r.dataset, r.batch) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (dataset, batch) in zip(axes[0], keys, strict=True):
        subset = [r for r in rows if (r.dataset, r.batch) == (dataset, batch)]
        base = next(r.tokens_per_s for r in subset if r.method == "none")
        ax.axhline(base, color="gray", linestyle="--", label="no speculation")
        for method in sorted({r.method for r in subset} - {"none"}):
            pts = sorted((r.budget, r.tokens_per_s) for r in subset if r.method == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_title(f"{dataset}, batch {batch}")
        ax.set_xlabel("draft budget (tokens)")
        ax.set_ylabel("output tokens/s")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
