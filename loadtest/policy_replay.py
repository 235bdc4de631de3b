"""Speculation policies compared on one shared step-cost table: their decisions, without the noise.

    python -m loadtest.policy_replay [--dataset mix] [--batch 1] [--prompts 16]
        [--budgets 1 2 4] [--max-budget 8] [--repeats 2] [--out loadtest/results/replay]

On a noisy 2-core host the same decode step scatters by 10-30% from run to run, more than the
gap between two good policies, so a tokens/s comparison of policies (``bench_spec``, a served
sweep) needs many repeats to say which chooses better. This benchmark asks the question
directly. Every configuration (no speculation, n-gram at fixed k, ``smartspec_uniform``,
``goodput``) runs the same prompts in one process, rounds rotated, and every decode step is
recorded: its requests, its rows (1 per request + drafts verified), the tokens it emitted and
its measured time. The steps of all configurations together give one cost table, the median
time of each (requests, rows) shape. Each configuration is then scored twice:

- measured: tokens emitted in decode steps / the measured time of those steps;
- replayed: the same tokens / the table's price of the same steps. Every configuration pays
  the same for the same shape, so the ratio between two configurations is the ratio of their
  decisions (which shapes they ran, and the tokens those shapes yielded), not of the moments
  the host was busy.

Prefill steps are left out of both (every configuration computes the same prompts). A shape
with fewer than ``--min-samples`` steps is priced by interpolating its request count's other
row counts, or at its own measured time when it lies outside them. Writes JSON and markdown
named by date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from loadtest.bench_engine import machine_info
from loadtest.bench_spec import (
    DATASET_FILES,
    WEIGHTS,
    configurations,
    encode_chat,
    load_prompts,
    make_engine,
    run_batch,
)
from loadtest.host import format_loadavg, loadavg
from server.engine.offline import OfflineEngine
from server.engine.plan import StepPlan
from server.model.loader import resolve_model
from server.model.runner import RunnerOutput

Shape = tuple[int, int]  # (requests, rows)


@dataclass(frozen=True)
class StepRecord:
    requests: int
    rows: int  # 1 per request + the draft tokens verified
    emitted: int  # tokens the step appended to its requests
    seconds: float  # the runner's measured time

    @property
    def shape(self) -> Shape:
        return (self.requests, self.rows)


def record_decode_steps(engine: OfflineEngine, records: list[StepRecord]) -> None:
    """Appends every pure decode step ``engine`` runs from now on to ``records`` (steps with
    a prompt chunk are left out: every configuration computes the same prompts)."""
    runner = engine.core.runner
    execute: Callable[[StepPlan], RunnerOutput] = runner.execute

    def recorded(plan: StepPlan) -> RunnerOutput:
        out = execute(plan)
        decoding = all(
            plan.num_scheduled_tokens[r.request_id] == 1
            and r.num_computed_tokens >= r.num_prompt_tokens
            for r in plan.requests
        )
        if plan.requests and decoding:
            records.append(
                StepRecord(
                    requests=len(plan.requests),
                    rows=len(plan.requests) + sum(plan.num_spec_tokens.values()),
                    emitted=sum(len(t) for t in out.sampled_token_ids.values()),
                    seconds=out.execute_time,
                )
            )
        return out

    runner.execute = recorded  # type: ignore[method-assign]


def cost_table(records: Iterable[StepRecord], min_samples: int = 5) -> dict[Shape, float]:
    """The median measured time of each shape with at least ``min_samples`` steps."""
    by_shape: dict[Shape, list[float]] = defaultdict(list)
    for r in records:
        by_shape[r.shape].append(r.seconds)
    return {s: statistics.median(v) for s, v in by_shape.items() if len(v) >= min_samples}


def price(record: StepRecord, table: dict[Shape, float]) -> tuple[float, bool]:
    """The table's price of the record's shape, and whether the table priced it (else the
    step's own measured time is used)."""
    if record.shape in table:
        return table[record.shape], True
    known = sorted(rows for (requests, rows) in table if requests == record.requests)
    if known and known[0] <= record.rows <= known[-1]:
        prices = [table[(record.requests, rows)] for rows in known]
        return float(np.interp(record.rows, known, prices)), True
    return record.seconds, False


@dataclass(frozen=True)
class Score:
    steps: int
    tokens: int
    measured_tokens_per_s: float
    replayed_tokens_per_s: float
    priced_share: float  # steps the table priced (the rest at their own time)
    rows_histogram: dict[int, int]  # steps by their rows (all requests' rows together)


def score(records: list[StepRecord], table: dict[Shape, float]) -> Score:
    tokens = sum(r.emitted for r in records)
    measured = sum(r.seconds for r in records)
    priced = [price(r, table) for r in records]
    replayed = sum(p for p, _ in priced)
    histogram: dict[int, int] = defaultdict(int)
    for r in records:
        histogram[r.rows] += 1
    return Score(
        steps=len(records),
        tokens=tokens,
        measured_tokens_per_s=round(tokens / measured, 2) if measured else 0.0,
        replayed_tokens_per_s=round(tokens / replayed, 2) if replayed else 0.0,
        priced_share=round(sum(ok for _, ok in priced) / len(priced), 3) if priced else 0.0,
        rows_histogram=dict(sorted(histogram.items())),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="mix", choices=DATASET_FILES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-budget", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-samples", type=int, default=5)
    ap.add_argument("--weights", default="int4", choices=list(WEIGHTS))
    ap.add_argument("--name", help="results file name (default: the date)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/replay"))
    args = ap.parse_args(argv)

    model_dir = resolve_model(args.model)
    configs = configurations(["ngram"], args.budgets, args.max_budget)
    load_start = loadavg()
    print(f"building {len(configs)} engines (load average {format_loadavg(load_start)})")
    engines = {c.label: make_engine(model_dir, c.spec, args.weights) for c in configs}
    prompts = encode_chat(engines["none"], load_prompts(DATASET_FILES[args.dataset], args.prompts))
    for label, engine in engines.items():  # warm every engine's caches and estimates
        run_batch(engine, prompts[: args.batch], args.batch, 16)
        print(f"  {label}: ready", flush=True)
    records: dict[str, list[StepRecord]] = {c.label: [] for c in configs}
    for label, engine in engines.items():
        record_decode_steps(engine, records[label])
    for rep in range(args.repeats):
        shift = rep % len(configs)
        for c in configs[shift:] + configs[:shift]:
            _, seconds = run_batch(engines[c.label], prompts, args.batch, args.new_tokens)
            print(f"round {rep + 1}/{args.repeats} {c.label:24s} {seconds:6.1f} s", flush=True)
    table = cost_table((r for rs in records.values() for r in rs), args.min_samples)
    scores = {label: score(rs, table) for label, rs in records.items()}
    write_report(args, scores, table, load_start, loadavg())
    return 0


def write_report(
    args: argparse.Namespace,
    scores: dict[str, Score],
    table: dict[Shape, float],
    load_start: list[float] | None,
    load_end: list[float] | None,
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = args.name or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = machine_info()
    command = "python -m loadtest.policy_replay " + " ".join(sys.argv[1:])
    base = scores["none"]
    (args.out / f"{stamp}.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine,
                "load_start": load_start,
                "load_end": load_end,
                "scores": {k: asdict(v) for k, v in scores.items()},
                "table_ms": {f"{q}x{r}": round(s * 1e3, 2) for (q, r), s in sorted(table.items())},
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"# Policies replayed on one cost table, {machine['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, commit "
        f"{machine['git_commit']}; load average {format_loadavg(load_start)} at the start, "
        f"{format_loadavg(load_end)} at the end. {args.model} ({args.weights}), "
        f"`{args.dataset}` prompts ({args.prompts}), batch {args.batch}, {args.new_tokens} new "
        f"tokens, greedy, {args.repeats} rounds in rotating order. Decode steps only.",
        "",
        "`replayed` prices every configuration's steps at the same table (the median measured "
        "time of each requests x rows shape over all configurations' steps), so its ratios "
        "compare decisions, not the moments the host was busy; `measured` is the steps' own "
        "time. See the module docstring.",
        "",
        "| configuration | steps | tokens | tokens/step | measured tok/s | replayed tok/s "
        "| replayed vs none | priced by table | rows per step (count) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, s in scores.items():
        rows = ", ".join(f"{r}: {n}" for r, n in s.rows_histogram.items())
        lines.append(
            f"| {label} | {s.steps} | {s.tokens} | {s.tokens / max(s.steps, 1):.2f} "
            f"| {s.measured_tokens_per_s:.1f} | {s.replayed_tokens_per_s:.1f} "
            f"| {s.replayed_tokens_per_s / base.replayed_tokens_per_s:.2f}x "
            f"| {s.priced_share:.0%} | {rows} |"
        )
    lines += ["", "Cost table (ms, requests x rows: median over all configurations' steps):", ""]
    lines.append(", ".join(f"{q}x{r}: {s * 1e3:.1f}" for (q, r), s in sorted(table.items())))
    (args.out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stamp}.md")


if __name__ == "__main__":
    raise SystemExit(main())
