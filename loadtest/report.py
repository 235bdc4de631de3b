"""report.md and sweep.json for a sweep: provenance (command, machine, git, date, load),
one section per dataset with its table and plots, errors."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.bench import write_json

# Offline benchmarks (bench_engine.py) describe the host as `report.machine_info()` and
# `report.git_info()`: keep both importable from here.
from loadtest.host import LoadAvg, format_loadavg, git_info, loadavg, machine_info
from loadtest.metrics import percentile_key
from loadtest.plots import (
    ACCEPTANCE,
    POLICY_PANELS,
    Results,
    latency_plot,
    throughput_plot,
    timeline_plot,
)
from loadtest.records import Sample
from loadtest.repeats import first_runs, group_by_rate, has_repeats, median_run, median_runs
from loadtest.sweep_config import SweepConfig
from loadtest.workload import percentiles


@dataclass
class SweepOutcome:
    """What a sweep produced, gathered as it runs and handed to `write_report`."""

    started: float  # time.time() at the sweep's start
    # /proc/loadavg read when the sweep started, before its first server: the machine's own
    # load, not the sweep's.
    loadavg_at_start: LoadAvg | None
    samples: dict[str, list[Sample]]  # dataset -> its prompts (before any run prefix)
    results: dict[str, Results] = field(default_factory=dict)  # dataset -> config -> runs
    failures: dict[str, str] = field(default_factory=dict)  # config -> why it stopped
    launched: dict[str, str] = field(default_factory=dict)  # config -> command line as run

    def add(self, dataset: str, config: str, result: dict[str, Any]) -> None:
        self.results.setdefault(dataset, {}).setdefault(config, []).append(result)


def plot_name(kind: str, dataset: str, multi_dataset: bool) -> str:
    """plots/<kind>.png for a one-dataset sweep (the layout before multi-dataset sweeps),
    plots/<kind>-<dataset>.png otherwise."""
    return f"{kind}-{dataset}.png" if multi_dataset else f"{kind}.png"


def tail_percentile(args: argparse.Namespace) -> str:
    """The table's tail column: p99 when measured, else the last --metric-percentiles."""
    ps = percentiles(args)
    return "p99" if 99.0 in ps else percentile_key(ps[-1])


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _table(results: Results, p: str) -> list[str]:
    repeated = has_repeats(results)
    head = [
        "config",
        "rate",
        *(["run"] if repeated else []),
        "ok/fail",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT mean",
        f"TTFT {p}",
        "TPOT mean",
        f"TPOT {p}",
        "E2EL mean",
        f"E2EL {p}",
        "accept",
        "acc. len",
        "budget",
        "step ms pred/meas",
        "load start/end",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        for r in runs:
            spec = r.get("spec_decode") or {}
            step = (
                f"{spec['predicted_step_ms']:.0f}/{spec['measured_step_ms']:.0f}"
                if "predicted_step_ms" in spec and "measured_step_ms" in spec
                else "-"
            )
            cells = [
                name,
                str(r["request_rate"]),
                *([str(r.get("repeat", 0) + 1)] if repeated else []),
                f"{r['completed']}/{r['failed']}",
                f"{r['request_throughput']:.2f}",
                f"{r['output_throughput']:.1f}",
                _num(r.get("request_goodput"), ".2f"),
                *(_ms(r.get(f"{s}_{m}_ms")) for m in ("ttft", "tpot", "e2el") for s in ("mean", p)),
                _num(spec.get("acceptance_rate"), ".2f"),
                _num(spec.get("mean_acceptance_length"), ".2f"),
                _num(spec.get("budget_mean"), ".2f"),
                step,
                f"{_num(r.get('loadavg_before'), '.1f')}/{_num(r.get('loadavg_after'), '.1f')}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _median_table(results: Results) -> list[str]:
    """Per configuration and rate: the median over its runs, and the spread of E2EL."""
    lines = [
        "| config | rate | runs | E2EL mean: median | min-max | spread | TTFT mean | "
        "TPOT mean | out tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        for group in group_by_rate(runs).values():
            m = median_run(group)
            e2el = [r["mean_e2el_ms"] for r in group if r.get("mean_e2el_ms") is not None]
            spread = f"{max(e2el) / min(e2el) - 1:.0%}" if e2el and min(e2el) > 0 else "-"
            span = f"{_ms(min(e2el))}-{_ms(max(e2el))}" if e2el else "-"
            lines.append(
                f"| {name} | {m['request_rate']} | {len(group)} | {_ms(m.get('mean_e2el_ms'))} "
                f"| {span} | {spread} | {_ms(m.get('mean_ttft_ms'))} | "
                f"{_ms(m.get('mean_tpot_ms'))} | {_num(m.get('output_throughput'), '.1f')} |"
            )
    return lines


def _dataset_section(
    dataset: str, results: Results, p: str, plots_dir: Path, multi: bool
) -> list[str]:
    lines = [f"### Dataset `{dataset}`", ""]
    if has_repeats(results):
        lines += [
            "Medians over each cell's runs (what the plots and `loadtest.policy_bars` use); "
            "spread = max / min - 1 of the runs' mean E2EL. Every run follows.",
            "",
            *_median_table(results),
            "",
        ]
    lines += [*_table(results, p), ""]
    medians = {name: median_runs(runs) for name, runs in results.items()}
    firsts = {name: first_runs(runs) for name, runs in results.items()}

    def png(kind: str) -> Path:
        return plots_dir / plot_name(kind, dataset, multi)

    figures = [
        ("latency vs rate", latency_plot(medians, png("latency"), p)),
        ("throughput vs rate", throughput_plot(medians, png("throughput"))),
        ("draft acceptance over time", timeline_plot(firsts, [ACCEPTANCE], png("acceptance"))),
        ("speculation policy over time", timeline_plot(firsts, POLICY_PANELS, png("policy"))),
    ]
    for alt, path in figures:
        if path is not None:
            lines += [f"![{dataset}: {alt}](plots/{path.name})", ""]
    missing = [alt for alt, path in figures if path is None]
    if missing:
        lines += [f"No server exported the series for: {'; '.join(missing)} (no plot).", ""]
    return lines


def _uniqueness_line(mode: str) -> str:
    if mode == "none":
        return (
            "- prompt uniqueness: `none`: every rate replays the same prompts to the same "
            "server, so from the second rate on its prefix cache may serve most prompt tokens "
            "(TTFT then understates a cold prompt)"
        )
    return (
        "- prompt uniqueness: `per_rate_prefix`: every prompt starts with a line naming its "
        "run, e.g. `[run r2-17 mix] ` (rate index 2, request 17), and warm-up prompts with "
        "`[warm-up 0] `, so no request reuses a cached prefix of another; a chat template's "
        "own header before the message (e.g. a default system prompt) is still shared"
    )


def _schedule_line(sweep: SweepConfig) -> str:
    runs = f"{sweep.repeats} runs" if sweep.repeats > 1 else "one run"
    if sweep.schedule == "interleaved":
        return (
            f"schedule `interleaved`: every configuration's server was up for the whole "
            f"sweep, and each dataset x rate x repeat ran as one round over all of them, the "
            f"order rotated one place per round; {runs} per configuration, dataset and rate"
        )
    each = "each dataset in turn" if sweep.multi_dataset else "it"
    return (
        f"schedule `sequential`: each configuration's server runs every rate of {each}, "
        f"{runs} per rate, before the next server starts"
    )


def write_report(
    out_dir: Path, sweep: SweepConfig, args: argparse.Namespace, outcome: SweepOutcome
) -> Path:
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    p = tail_percentile(args)
    machine = {
        **machine_info(),
        "loadavg_at_start": outcome.loadavg_at_start,
        "loadavg_at_end": loadavg(),
    }
    git = git_info()
    cmd = shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "loadtest", *sys.argv[1:]])
    sizes = sorted({len(s) for s in outcome.samples.values()})
    datasets = ", ".join(f"`{d}`" for d in sweep.datasets)
    lines = [
        f"# Load test: {sweep.name}",
        "",
        sweep.description.strip(),
        "",
        "## Provenance",
        "",
        f"- command: `{cmd}` (from `{os.getcwd()}`)",
        f"- date: {datetime.fromtimestamp(outcome.started).isoformat(timespec='seconds')} "
        f"to {datetime.now().isoformat(timespec='seconds')}",
        f"- git commit: {git['commit']} (tracked changes: {git['dirty']})",
        f"- machine: {machine['cpu_model']} ({machine['cpu_simd']}); "
        f"{machine['usable_cores']} usable of {machine['logical_cores']} logical cores; "
        f"{machine['memory_gib']} GiB RAM; "
        f"{machine['os']}; Python {machine['python']}; load average at start "
        f"{format_loadavg(outcome.loadavg_at_start)} (before the first server started), "
        f"at the end {format_loadavg(machine['loadavg_at_end'])}",
        f"- workload: {'/'.join(map(str, sizes))} prompts per rate of {datasets}, "
        f"output tokens {args.max_tokens or 'dataset default'}, ignore_eos {args.ignore_eos}, "
        f"burstiness {args.burstiness}, max concurrency {args.max_concurrency}, "
        f"seed {args.seed}, endpoint `{args.endpoint}`, goodput SLOs {args.goodput or 'none'}",
        _uniqueness_line(sweep.prompt_uniqueness),
        f"- rates (req/s): {', '.join(str(r) for r in sweep.rates)}; {_schedule_line(sweep)}",
        "",
        "## Configurations",
        "",
    ]
    for c in sweep.configurations:
        how = outcome.launched.get(c.name) or (
            shlex.join(c.serve_args or c.command or ()) or f"already running at {c.base_url}"
        )
        lines.append(f"- **{c.name}**: `{how}`")
        if c.name in outcome.failures:
            first, _, tail = outcome.failures[c.name].partition("\n")
            lines.append(f"  - **failed**: {first}")
            if tail:
                lines += ["", "    ```", *("    " + ln for ln in tail.splitlines()), "    ```"]
    lines += ["", f"## Results (latencies in ms: mean and {p})", ""]
    for dataset in sweep.datasets:
        results = outcome.results.get(dataset)
        if results:
            lines += _dataset_section(dataset, results, p, plots_dir, sweep.multi_dataset)
    if outcome.results:
        lines += [
            "`accept` = accepted / drafted tokens and `acc. len` = 1 + accepted / drafts; "
            "`budget` = the mean per-request speculation budget the policy chose and `step ms "
            "pred/meas` = its predicted and the measured mean step time; all from the "
            "server's /metrics before and after each run ('-': not exported). `load start/end` "
            "= the machine's 1-minute load average before and after the run (the cores may "
            "be shared: compare it with the usable cores above).",
            "",
        ]
    errors = {
        (d, n, e)
        for d, results in outcome.results.items()
        for n, runs in results.items()
        for r in runs
        for e in r["errors"]
        if e
    }
    if errors:
        lines += ["## Errors (distinct)", ""]
        lines += [f"- {d} / {n}: {e[:300]}" for d, n, e in sorted(errors)[:20]]
        lines.append("")
    layout = "runs/<config>/<dataset>/" if sweep.multi_dataset else "runs/<config>/"
    lines += [
        f"Per-run result JSON (vLLM `bench serve` keys + per-request detail): "
        f"`{layout}rate-<r>{'-rep<k>' if sweep.repeats > 1 else ''}.json`. "
        "Server logs: `logs/`.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    write_json(
        out_dir / "sweep.json",
        {
            "name": sweep.name,
            "command": cmd,
            "machine": machine,
            "git": git,
            "rates": [str(r) for r in sweep.rates],
            "datasets": list(sweep.datasets),
            "prompt_uniqueness": sweep.prompt_uniqueness,
            "repeats": sweep.repeats,
            "schedule": sweep.schedule,
            "failures": outcome.failures,
            "summary": {
                d: {
                    n: [
                        {k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in runs
                    ]
                    for n, runs in results.items()
                }
                for d, results in outcome.results.items()
            },
        },
    )
    return path
