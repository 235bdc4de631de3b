"""Speculation policies and drafters side by side on the embedded model: none, fixed k,
SmartSpec, goodput, for each drafter method.

    python -m loadtest.bench_spec [--methods ngram] [--budgets 1 2 4 8] [--max-budget 8]
        [--policies fixed smartspec_uniform goodput] [--batch-sizes 1 8 32]
        [--datasets repetitive free-form mix] [--new-tokens 64] [--repeats 2]
        [--weights int4] [--out loadtest/results/spec] [--name DATE]

Every configuration's engine is built first (the cost-aware policies run their start-up
profile then) and kept in memory; each cell (dataset x batch size) then runs every
configuration in turn, ``--repeats`` times in a rotating order, so drift of this noisy
machine hits all of them alike. A cell's tokens/s is the median over repeats of output
tokens / wall time of the whole batch (greedy, ignore_eos). Batch b runs b prompts at once
(batch 1: 4 prompts one after another). Outputs are checked identical to no speculation.

Configurations per drafter method: fixed with each of ``--budgets``; smartspec_uniform and
goodput with ``num_speculative_tokens = --max-budget`` (``--policies`` picks among them).

Drafters that learn across requests (recycle's shared table, the suffix cache, auto) would
otherwise draft a repeat from the previous run of the same prompts. So every engine first
serves a warm-up set of prompts that no cell measures (the last ones of each dataset file: the
"earlier traffic" a server has seen), its drafter's state is saved, and every timed run
starts from that saved state.

Writes JSON, a markdown table and a PNG named by date (or ``--name``), with the bars the
goodput policy must clear and, per drafter, its acceptance, mean accepted length and speed-up.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
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
# The warm-up prompts: the tail of each file, beyond what any cell measures (cells take the
# first prompts of a file: up to 32 of one file, or 16 of each in the mix).
_WARMUP_FROM = {"repetitive.jsonl": 32, "chat.jsonl": 32}
_WARMUP_TOKENS = 64
WEIGHTS = {
    "int4": ModelConfig(model="", quantization="int4"),
    "fp32": ModelConfig(model="", dtype="float32", quantization="none"),
}


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
    # Requests whose output equals no speculation's, and the share of output tokens before
    # the first difference (1.0 = identical), over the cell's prompts.
    identical_requests: float = 1.0
    matching_prefix: float = 1.0
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


def make_engine(model_dir: Path, spec: SpeculativeConfig, weights: str = "int4") -> OfflineEngine:
    return OfflineEngine(
        EngineConfig(
            model=dataclasses.replace(WEIGHTS[weights], model=str(model_dir)),
            # No prefix-cache reuse across repeats: every run computes its prompts. 256 MiB of
            # KV each (~5.8k tokens) leaves room for every configuration's engine at once.
            cache=CacheConfig(enable_prefix_caching=False, kv_cache_memory=256 << 20),
            scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048),
            speculative=spec,
            separate_process=False,
        )
    )


POLICIES = ("fixed", "smartspec_uniform", "goodput")


def method_options(name: str) -> tuple[str, dict[str, str]]:
    """A drafter as these benchmarks name it: ``recycle`` or ``recycle/layered`` (recycle with
    that table scope; ``auto/request`` likewise) -> the method and its extra config options."""
    method, _, scope = name.partition("/")
    return method, ({"recycle_scope": scope} if scope else {})


def configurations(
    methods: list[str], budgets: list[int], max_budget: int, policies: Sequence[str] = POLICIES
) -> list[Configuration]:
    """``methods``: drafter names, or ``recycle/request`` for recycle with per-request tables."""
    out = [Configuration("none", "none", "-", 0, SpeculativeConfig())]
    for m in methods:
        method, extra = method_options(m)
        if "fixed" in policies:
            for k in budgets:
                spec = SpeculativeConfig(
                    method=method,  # type: ignore[arg-type]
                    num_speculative_tokens=k,
                    policy="fixed",
                    **extra,  # type: ignore[arg-type]
                )
                out.append(Configuration(f"{m} fixed k={k}", "fixed", m, k, spec))
        for policy in (p for p in ("smartspec_uniform", "goodput") if p in policies):
            spec = SpeculativeConfig(
                method=method,  # type: ignore[arg-type]
                num_speculative_tokens=max_budget,
                policy=policy,
                **extra,  # type: ignore[arg-type]
            )
            out.append(Configuration(f"{m} {policy}", policy, m, max_budget, spec))
    return out


def warmup_prompts() -> list[str]:
    """The prompts no cell measures (see ``_WARMUP_FROM``)."""
    out: list[str] = []
    for name, start in _WARMUP_FROM.items():
        lines = [x for x in (DATASETS / name).read_text().splitlines() if x.strip()]
        out += [json.loads(x)["prompt"] for x in lines[start:]]
    return out


def restore_drafter(engine: OfflineEngine, saved: object) -> None:
    """Puts a copy of the saved drafter state back, so every run starts from the same one."""
    if saved is None:
        return
    drafter = copy.deepcopy(saved)
    engine.core.drafter = drafter  # type: ignore[assignment]
    assert engine.core.speculator is not None
    engine.core.speculator.drafter = drafter  # type: ignore[assignment]


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
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--weights", default="int4", choices=list(WEIGHTS))
    ap.add_argument("--name", help="results file name (default: the date)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--datasets", nargs="+", default=list(DATASET_FILES), choices=DATASET_FILES)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/spec"))
    args = ap.parse_args(argv)

    model_dir = resolve_model(args.model)
    configs = configurations(args.methods, args.budgets, args.max_budget, args.policies)
    print(f"building {len(configs)} engines (load average {format_loadavg(loadavg())})")
    engines = {}
    saved: dict[str, object] = {}
    warmup: list[list[int]] = []
    for c in configs:
        engine = engines[c.label] = make_engine(model_dir, c.spec, args.weights)
        warmup = warmup or encode_chat(engine, warmup_prompts())
        # The earlier traffic every run starts from (a plain engine only warms its caches).
        run_batch(engine, warmup, 8, _WARMUP_TOKENS)
        saved[c.label] = copy.deepcopy(engine.core.drafter)
        print(f"  {c.label}: ready", flush=True)
    tokenizer_engine = engines["none"]
    rows: list[Row] = []
    for dataset in args.datasets:
        for batch in args.batch_sizes:
            n = _BATCH1_PROMPTS if batch == 1 else batch
            prompts = encode_chat(tokenizer_engine, load_prompts(DATASET_FILES[dataset], n))
            rows += run_cell(args, configs, engines, saved, dataset, batch, prompts)
    write_report(args, rows)
    return 0


def run_cell(
    args: argparse.Namespace,
    configs: list[Configuration],
    engines: dict[str, OfflineEngine],
    saved: dict[str, object],
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
            restore_drafter(engines[c.label], saved[c.label])
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
            identical_requests=round(identical_share(outputs[c.label], outputs["none"]), 3),
            matching_prefix=round(matching_prefix(outputs[c.label], outputs["none"]), 3),
            loadavg_before=list(load) if load else [],
        )
        rows.append(row)
        print(
            f"{dataset:10s} batch {batch:2d} {c.label:24s} {row.tokens_per_s:7.1f} tok/s "
            f"(runs {row.runs_tokens_per_s})  acceptance {row.acceptance_rate:.2f}  "
            f"mean budget {row.mean_budget:.2f}  identical {row.identical_requests:.0%} "
            f"(matching prefix {row.matching_prefix:.0%})",
            flush=True,
        )
    return rows


def identical_share(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """The share of requests whose tokens equal the reference's."""
    return sum(a == b for a, b in zip(outputs, reference, strict=True)) / len(reference)


def matching_prefix(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """The share of reference tokens that come before each output's first difference."""
    same = 0
    for a, b in zip(outputs, reference, strict=True):
        common = min(len(a), len(b))
        same += next((i for i in range(common) if a[i] != b[i]), common)
    return same / max(sum(len(b) for b in reference), 1)


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


# The training-free drafters (issue 12) and the bars they must clear.
_LEARNING_METHODS = ("recycle", "auto")
_FREE_FORM_SPEEDUP_BAR = 1.5
_ACCEPTED_LENGTH_BAR = 1.8


def drafter_summary(rows: list[Row], max_budget: int) -> list[dict[str, object]]:
    """Per cell and drafter method: its best configuration's speed-up over none, and the
    acceptance and mean accepted length of its fixed k = max budget configuration."""
    out = []
    for dataset, batch in sorted({(r.dataset, r.batch) for r in rows}):
        cell = [r for r in rows if (r.dataset, r.batch) == (dataset, batch)]
        none = next(r for r in cell if r.policy == "none")
        for method in dict.fromkeys(r.method for r in cell if r.method != "-"):
            mine = [r for r in cell if r.method == method]
            best = max(mine, key=lambda r: r.tokens_per_s)
            full = next((r for r in mine if r.policy == "fixed" and r.budget == max_budget), None)
            goodput = next((r for r in mine if r.policy == "goodput"), None)
            out.append(
                {
                    "dataset": dataset,
                    "batch": batch,
                    "method": method,
                    "best": best.config,
                    "best_speedup": round(best.tokens_per_s / none.tokens_per_s, 3),
                    "goodput_speedup": (
                        round(goodput.tokens_per_s / none.tokens_per_s, 3) if goodput else None
                    ),
                    "acceptance_at_max": full.acceptance_rate if full else None,
                    "accepted_length_at_max": full.mean_accepted_length if full else None,
                }
            )
    return out


def drafter_bars(summary: list[dict[str, object]]) -> list[tuple[str, str, bool]]:
    """(bar, measured, passes) for the drafter targets that this run's cells can show."""
    bars = []
    free_b1 = [
        s
        for s in summary
        if s["dataset"] == "free-form" and s["batch"] == 1 and drafter(s) in _LEARNING_METHODS
    ]
    if free_b1:
        top = max(free_b1, key=lambda s: float(s["best_speedup"]))  # type: ignore[arg-type]
        bars.append(
            (
                f"recycle or auto on free-form, batch 1: >= {_FREE_FORM_SPEEDUP_BAR}x none",
                f"{top['best_speedup']:.2f}x ({top['best']})",
                float(top["best_speedup"]) >= _FREE_FORM_SPEEDUP_BAR,  # type: ignore[arg-type]
            )
        )
    lengths = [s for s in summary if s["accepted_length_at_max"] is not None]
    if lengths:
        top = max(lengths, key=lambda s: float(s["accepted_length_at_max"]))  # type: ignore[arg-type]
        bars.append(
            (
                f"mean accepted length >= {_ACCEPTED_LENGTH_BAR} at the max budget",
                f"{top['accepted_length_at_max']:.2f} ({top['method']}, {top['dataset']}, "
                f"batch {top['batch']})",
                float(top["accepted_length_at_max"]) >= _ACCEPTED_LENGTH_BAR,  # type: ignore[arg-type]
            )
        )
    for batch in sorted({int(s["batch"]) for s in summary}):  # type: ignore[call-overload]
        cell = [s for s in summary if s["dataset"] == "repetitive" and s["batch"] == batch]
        autos = [s for s in cell if drafter(s) == "auto"]
        ngrams = [s for s in cell if drafter(s) == "ngram"]
        if autos and ngrams:
            # Each by its best configuration (and, with several table scopes, its best scope).
            auto = max(autos, key=lambda s: float(s["best_speedup"]))  # type: ignore[arg-type]
            ngram = max(ngrams, key=lambda s: float(s["best_speedup"]))  # type: ignore[arg-type]
            bars.append(
                (
                    f"repetitive, batch {batch}: auto no worse than ngram (best configurations)",
                    f"{auto['best_speedup']:.2f}x ({auto['best']}) against "
                    f"{ngram['best_speedup']:.2f}x",
                    float(auto["best_speedup"]) >= float(ngram["best_speedup"]),  # type: ignore[arg-type]
                )
            )
    return bars


def drafter(summary_row: dict[str, object]) -> str:
    """The drafter of a summary row's method: ``recycle/request`` is recycle (with a scope)."""
    return method_options(str(summary_row["method"]))[0]


def write_report(args: argparse.Namespace, rows: list[Row]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = args.name or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = machine_info()
    command = "python -m loadtest.bench_spec " + " ".join(sys.argv[1:])
    verdicts = cell_verdicts(rows)
    summary = drafter_summary(rows, args.max_budget)
    (out / f"{stamp}.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine,
                "rows": [r.__dict__ for r in rows],
                "verdicts": verdicts,
                "drafters": summary,
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
        f"commit {machine['git_commit']}. Model: {args.model} ({args.weights} weights, CPU, "
        f"one engine thread), "
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
        "## Drafters",
        "",
        f"Per drafter: its best configuration, and its acceptance and mean accepted length "
        f"(tokens per verify step, bonus included) at fixed k = {args.max_budget}.",
        "",
        "| dataset | batch | method | best configuration | speed-up | goodput speed-up | "
        f"acceptance at k={args.max_budget} | mean accepted length |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for d in summary:
        goodput = f"{d['goodput_speedup']:.2f}x" if d["goodput_speedup"] is not None else "-"
        acc = f"{d['acceptance_at_max']:.2f}" if d["acceptance_at_max"] is not None else "-"
        length = (
            f"{d['accepted_length_at_max']:.2f}" if d["accepted_length_at_max"] is not None else "-"
        )
        lines.append(
            f"| {d['dataset']} | {d['batch']} | {d['method']} | {d['best']} | "
            f"{d['best_speedup']:.2f}x | {goodput} | {acc} | {length} |"
        )
    bars = drafter_bars(summary)
    if bars:
        lines += ["", "| drafter bar | measured | passes |", "|---|---|---|"]
        lines += [f"| {b} | {m} | {'yes' if ok else 'NO'} |" for b, m, ok in bars]
    lines += [
        "",
        "## Every cell",
        "",
        "| dataset | batch | configuration | tok/s | runs | speed-up | acceptance | mean "
        "accepted length | mean budget | identical to none |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = r.tokens_per_s / base[(r.dataset, r.batch)]
        lines.append(
            f"| {r.dataset} | {r.batch} | {r.config} | {r.tokens_per_s} | "
            f"{' / '.join(str(x) for x in r.runs_tokens_per_s)} | {speedup:.2f}x | "
            f"{r.acceptance_rate:.2f} | {r.mean_accepted_length:.2f} | {r.mean_budget:.2f} | "
            f"{identical_cell(r)} |"
        )
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stamp}.md'}")


def identical_cell(r: Row) -> str:
    if r.identical_to_plain:
        return "yes"
    return f"NO: {r.identical_requests:.0%} of requests, {r.matching_prefix:.0%} of tokens"


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
