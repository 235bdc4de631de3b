"""Speculation policies side by side on the embedded model: none, fixed k, SmartSpec, goodput.

    python -m loadtest.bench_spec [--methods ngram] [--budgets 1 2 4 8] [--max-budget 8]
        [--batch-sizes 1 8 32] [--datasets repetitive free-form mix] [--new-tokens 64]
        [--repeats 2] [--out loadtest/results/spec]

Every configuration's engine is built first (the cost-aware policies run their start-up
profile then) and kept in memory; each cell (dataset x batch size) then runs every
configuration in turn, ``--repeats`` times in a rotating order, so drift of this noisy
machine hits all of them alike. A cell's tokens/s is the median over repeats of output
tokens / wall time of the whole batch (greedy, ignore_eos). Batch b runs b prompts at once
(batch 1: 4 prompts one after another). Outputs are checked identical to no speculation.

Configurations per drafter method: fixed with each of ``--budgets``; smartspec_uniform and
goodput with ``num_speculative_tokens = --max-budget``. Writes JSON, a markdown table and a
PNG named by date, with the bars the goodput policy must clear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.bench_engine import machine_info
from loadtest.host import format_loadavg, loadavg
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
DATASET_FILES = {
    "repetitive": ["repetitive.jsonl"],
    "free-form": ["chat.jsonl"],
    "mix": ["repetitive.jsonl", "chat.jsonl"],
}
# Batch 1 runs this many prompts one after another (a lone request is the slowest cell).
_BATCH1_PROMPTS = 4


@dataclass
class Row:
    dataset: str
    batch: int
    config: str
    policy: str
    method: str
    budget: int
    tokens_per_s: float
    runs_tokens_per_s: list[float]
    output_tokens: int
    acceptance_rate: float
    mean_accepted_length: float
    mean_budget: float
    identical_to_plain: bool
    loadavg_before: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Configuration:
    label: str
    policy: str
    method: str
    budget: int
    spec: SpeculativeConfig


def load_prompts(names: list[str], n: int) -> list[str]:
    """n prompts from the files, interleaved (the mix alternates repetitive and chat)."""
    per_file = [
        [json.loads(x)["prompt"] for x in (DATASETS / f).read_text().splitlines() if x.strip()]
        for f in names
    ]
    out: list[str] = []
    for i in range(max(len(p) for p in per_file)):
        out += [p[i] for p in per_file if i < len(p)]
    if len(out) < n:  # a small dataset repeats (identical prompts are fine: no prefix cache)
        out = (out * (n // len(out) + 1))[:n]
    return out[:n]


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
            # No prefix-cache reuse across repeats: every run computes its prompts. 256 MiB of
            # KV each (~5.8k tokens) leaves room for every configuration's engine at once.
            cache=CacheConfig(enable_prefix_caching=False, kv_cache_memory=256 << 20),
            scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048),
            speculative=spec,
            separate_process=False,
        )
    )


def configurations(methods: list[str], budgets: list[int], max_budget: int) -> list[Configuration]:
    out = [Configuration("none", "none", "-", 0, SpeculativeConfig())]
    for m in methods:
        for k in budgets:
            spec = SpeculativeConfig(method=m, num_speculative_tokens=k, policy="fixed")  # type: ignore[arg-type]
            out.append(Configuration(f"{m} fixed k={k}", "fixed", m, k, spec))
        for policy in ("smartspec_uniform", "goodput"):
            spec = SpeculativeConfig(method=m, num_speculative_tokens=max_budget, policy=policy)  # type: ignore[arg-type]
            out.append(Configuration(f"{m} {policy}", policy, m, max_budget, spec))
    return out


def run_batch(
    engine: OfflineEngine, prompts: list[list[int]], batch: int, new_tokens: int
) -> tuple[list[list[int]], float]:
    """Generates every prompt (in groups of `batch`); returns outputs and wall seconds."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += [r.token_ids for r in engine.generate(prompts[i : i + batch], params)]
    return outputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", nargs="+", default=["ngram"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-budget", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--datasets", nargs="+", default=list(DATASET_FILES), choices=DATASET_FILES)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/spec"))
    args = ap.parse_args(argv)

    model_dir = resolve_model(args.model)
    configs = configurations(args.methods, args.budgets, args.max_budget)
    print(f"building {len(configs)} engines (load average {format_loadavg(loadavg())})")
    engines = {}
    for c in configs:
        engines[c.label] = make_engine(model_dir, c.spec)
        engines[c.label].generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
        print(f"  {c.label}: ready", flush=True)
    tokenizer_engine = engines["none"]
    rows: list[Row] = []
    for dataset in args.datasets:
        for batch in args.batch_sizes:
            n = _BATCH1_PROMPTS if batch == 1 else batch
            prompts = encode_chat(tokenizer_engine, load_prompts(DATASET_FILES[dataset], n))
            rows += run_cell(args, configs, engines, dataset, batch, prompts)
    write_report(args, rows)
    return 0


def run_cell(
    args: argparse.Namespace,
    configs: list[Configuration],
    engines: dict[str, OfflineEngine],
    dataset: str,
    batch: int,
    prompts: list[list[int]],
) -> list[Row]:
    speeds: dict[str, list[float]] = {c.label: [] for c in configs}
    outputs: dict[str, list[list[int]]] = {}
    before = {c.label: engines[c.label].core.stats() for c in configs}
    load = loadavg()
    for rep in range(args.repeats):
        shift = rep % len(configs)
        for c in configs[shift:] + configs[:shift]:
            out, seconds = run_batch(engines[c.label], prompts, batch, args.new_tokens)
            outputs[c.label] = out
            speeds[c.label].append(sum(len(o) for o in out) / seconds)
    rows = []
    for c in configs:
        after = engines[c.label].core.stats()
        b = before[c.label]
        drafts = after.num_drafts - b.num_drafts
        proposed = after.num_draft_tokens - b.num_draft_tokens
        accepted = after.num_accepted_tokens - b.num_accepted_tokens
        mean_budget = 0.0
        if after.speculation is not None and b.speculation is not None:
            count = sum(after.speculation.budget_counts) - sum(b.speculation.budget_counts)
            total = after.speculation.budget_sum - b.speculation.budget_sum
            mean_budget = total / count if count else 0.0
        row = Row(
            dataset=dataset,
            batch=batch,
            config=c.label,
            policy=c.policy,
            method=c.method,
            budget=c.budget,
            tokens_per_s=round(statistics.median(speeds[c.label]), 2),
            runs_tokens_per_s=[round(s, 2) for s in speeds[c.label]],
            output_tokens=sum(len(o) for o in outputs[c.label]),
            acceptance_rate=round(accepted / proposed, 3) if proposed else 0.0,
            mean_accepted_length=round(1 + accepted / drafts, 3) if drafts else 1.0,
            mean_budget=round(mean_budget, 2),
            identical_to_plain=outputs[c.label] == outputs["none"],
            loadavg_before=list(load) if load else [],
        )
        rows.append(row)
        print(
            f"{dataset:10s} batch {batch:2d} {c.label:24s} {row.tokens_per_s:7.1f} tok/s "
            f"(runs {row.runs_tokens_per_s})  acceptance {row.acceptance_rate:.2f}  "
            f"mean budget {row.mean_budget:.2f}  identical {row.identical_to_plain}",
            flush=True,
        )
    return rows


def cell_verdicts(rows: list[Row]) -> list[dict[str, object]]:
    """Per cell and method: goodput against none and against the best other configuration."""
    verdicts = []
    for dataset, batch in sorted({(r.dataset, r.batch) for r in rows}):
        cell = [r for r in rows if (r.dataset, r.batch) == (dataset, batch)]
        none = next(r for r in cell if r.policy == "none")
        for g in (r for r in cell if r.policy == "goodput"):
            others = [r for r in cell if r is not g and r.method in (g.method, "-")]
            best = max(others, key=lambda r: r.tokens_per_s)
            verdicts.append(
                {
                    "dataset": dataset,
                    "batch": batch,
                    "method": g.method,
                    "goodput": g.tokens_per_s,
                    "vs_none": round(g.tokens_per_s / none.tokens_per_s, 3),
                    "best_other": best.config,
                    "vs_best_other": round(g.tokens_per_s / best.tokens_per_s, 3),
                    "passes": g.tokens_per_s >= 0.95 * best.tokens_per_s
                    and g.tokens_per_s >= 0.97 * none.tokens_per_s,
                }
            )
    return verdicts


def write_report(args: argparse.Namespace, rows: list[Row]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = machine_info()
    command = "python -m loadtest.bench_spec " + " ".join(sys.argv[1:])
    verdicts = cell_verdicts(rows)
    (out / f"{stamp}.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine,
                "rows": [r.__dict__ for r in rows],
                "verdicts": verdicts,
            },
            indent=2,
        )
        + "\n"
    )
    plot = out / f"{stamp}.png"
    plot_rows(rows, plot)
    base = {(r.dataset, r.batch): r.tokens_per_s for r in rows if r.policy == "none"}
    loads = sorted({tuple(r.loadavg_before) for r in rows if r.loadavg_before})
    lines = [
        f"# Speculation policies side by side, {machine['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"commit {machine['git_commit']}. Model: {args.model} (float32, CPU), "
        f"{args.new_tokens} new tokens per prompt, greedy; batch 1 = {_BATCH1_PROMPTS} prompts "
        f"in turn, batch b = b prompts at once; tokens/s = median of {args.repeats} runs in "
        f"rotating order. Load average at the start of each cell: "
        f"{', '.join(format_loadavg(list(x)) for x in loads) or 'n/a'}.",
        "",
        f"![tokens/s per policy]({plot.name})",
        "",
        "## Goodput against the others",
        "",
        "Bars: goodput's tokens/s >= 0.95x the best other configuration and >= 0.97x `none`.",
        "",
        "| dataset | batch | method | goodput tok/s | vs none | best other | vs best other | "
        "passes |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for v in verdicts:
        lines.append(
            f"| {v['dataset']} | {v['batch']} | {v['method']} | {v['goodput']} | "
            f"{v['vs_none']:.2f}x | {v['best_other']} | {v['vs_best_other']:.2f}x | "
            f"{'yes' if v['passes'] else 'NO'} |"
        )
    lines += [
        "",
        "## Every cell",
        "",
        "| dataset | batch | configuration | tok/s | runs | speed-up | acceptance | mean "
        "accepted length | mean budget | identical |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = r.tokens_per_s / base[(r.dataset, r.batch)]
        lines.append(
            f"| {r.dataset} | {r.batch} | {r.config} | {r.tokens_per_s} | "
            f"{' / '.join(str(x) for x in r.runs_tokens_per_s)} | {speedup:.2f}x | "
            f"{r.acceptance_rate:.2f} | {r.mean_accepted_length:.2f} | {r.mean_budget:.2f} | "
            f"{'yes' if r.identical_to_plain else 'NO'} |"
        )
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stamp}.md'}")


def plot_rows(rows: list[Row], path: Path) -> None:
    keys = sorted({(r.dataset, r.batch) for r in rows})
    configs = list(dict.fromkeys(r.config for r in rows))
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (dataset, batch) in zip(axes.flat, keys, strict=False):
        cell = {r.config: r for r in rows if (r.dataset, r.batch) == (dataset, batch)}
        base = cell["none"].tokens_per_s
        speedups = [cell[c].tokens_per_s / base if c in cell else 0.0 for c in configs]
        bars = ax.bar(
            range(len(configs)), speedups, color=[colors[i % 10] for i in range(len(configs))]
        )
        for bar, c in zip(bars, configs, strict=True):
            if cell.get(c) and cell[c].policy == "goodput":
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_title(f"{dataset}, batch {batch} (none: {base:.0f} tok/s)")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up over none")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
