"""report.md for a sweep: provenance (command, machine, git, date), tables, plots."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.bench import write_json
from loadtest.metrics import percentile_key
from loadtest.plots import latency_plot, spec_timeline_plot, throughput_plot
from loadtest.records import Sample

if TYPE_CHECKING:
    from loadtest.sweep import SweepConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(ln.split()[1])
            for ln in _read("/proc/meminfo").splitlines()
            if ln.startswith("MemTotal:")
        ),
        0,
    )
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
    }


def git_info() -> dict[str, str]:
    def git(*a: str) -> str:
        try:
            r = subprocess.run(
                ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "none (no commit yet)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": "yes" if dirty else "no"}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _table(results: dict[str, list[dict[str, Any]]], p: str) -> list[str]:
    head = [
        "config",
        "rate",
        "ok/fail",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT med",
        f"TTFT {p}",
        "TPOT med",
        f"TPOT {p}",
        "E2EL med",
        f"E2EL {p}",
        "accept",
        "acc. len",
        "load",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        for r in runs:
            spec = r.get("spec_decode") or {}
            g = r.get("request_goodput")
            cells = [
                name,
                str(r["request_rate"]),
                f"{r['completed']}/{r['failed']}",
                f"{r['request_throughput']:.2f}",
                f"{r['output_throughput']:.1f}",
                "-" if g is None else f"{g:.2f}",
                _ms(r.get("median_ttft_ms")),
                _ms(r.get(f"{p}_ttft_ms")),
                _ms(r.get("median_tpot_ms")),
                _ms(r.get(f"{p}_tpot_ms")),
                _ms(r.get("median_e2el_ms")),
                _ms(r.get(f"{p}_e2el_ms")),
                f"{spec['acceptance_rate']:.2f}" if "acceptance_rate" in spec else "-",
                f"{spec['mean_acceptance_length']:.2f}"
                if "mean_acceptance_length" in spec
                else "-",
                "-" if r.get("loadavg_after") is None else f"{r['loadavg_after']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    out_dir: Path,
    sweep: SweepConfig,
    args: argparse.Namespace,
    results: dict[str, list[dict[str, Any]]],
    failures: dict[str, str],
    launched: dict[str, str],
    started: float,
    samples: list[Sample],
) -> Path:
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    p = percentile_key(float(args.metric_percentiles.split(",")[-1]))
    machine, git = machine_info(), git_info()
    cmd = shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "loadtest", *sys.argv[1:]])
    lines = [
        f"# Load test: {sweep.name}",
        "",
        sweep.description.strip(),
        "",
        "## Provenance",
        "",
        f"- command: `{cmd}` (from `{os.getcwd()}`)",
        f"- date: {datetime.fromtimestamp(started).isoformat(timespec='seconds')} "
        f"to {datetime.now().isoformat(timespec='seconds')}",
        f"- git commit: {git['commit']} (tracked changes: {git['dirty']})",
        f"- machine: {machine['cpu_model']}; {machine['usable_cores']} usable of "
        f"{machine['logical_cores']} logical cores; {machine['memory_gib']} GiB RAM; "
        f"{machine['os']}; Python {machine['python']}; load average at start "
        f"{' '.join(machine['loadavg_at_start'])}",
        f"- workload: {len(samples)} prompts of `{args.dataset_name}`, "
        f"output tokens {args.max_tokens or 'dataset default'}, ignore_eos {args.ignore_eos}, "
        f"burstiness {args.burstiness}, max concurrency {args.max_concurrency}, "
        f"seed {args.seed}, endpoint `{args.endpoint}`, goodput SLOs {args.goodput or 'none'}",
        f"- rates (req/s): {', '.join(str(r) for r in sweep.rates)}",
        "",
        "## Configurations",
        "",
    ]
    for c in sweep.configurations:
        how = launched.get(c.name) or (
            shlex.join(c.serve_args or c.command or ()) or f"already running at {c.base_url}"
        )
        lines.append(f"- **{c.name}**: `{how}`")
        if c.name in failures:
            first, _, tail = failures[c.name].partition("\n")
            lines.append(f"  - **failed**: {first}")
            if tail:
                lines += ["", "    ```", *("    " + ln for ln in tail.splitlines()), "    ```"]
    lines += ["", f"## Results (latencies in ms; {p} = the last --metric-percentiles)", ""]
    if results:
        lines += _table(results, p)
        lines += [
            "",
            "`accept` = accepted / drafted tokens and `acc. len` = 1 + accepted / "
            "drafts, from the server's /metrics before and after each run ('-': not "
            "exported). `load` = the machine's 1-minute load average after the run (the "
            "cores may be shared: compare it with the usable cores above).",
            "",
        ]
        latency_plot(results, plots_dir / "latency.png", p)
        throughput_plot(results, plots_dir / "throughput.png")
        lines += ["![latency](plots/latency.png)", "", "![throughput](plots/throughput.png)", ""]
        if spec_timeline_plot(results, plots_dir / "spec_timeline.png"):
            lines += ["![speculation over time](plots/spec_timeline.png)", ""]
        else:
            lines += ["No server exported speculative-decoding metrics; no timeline plot.", ""]
        errors = {(n, e) for n, runs in results.items() for r in runs for e in r["errors"] if e}
        if errors:
            lines += ["## Errors (distinct)", ""]
            lines += [f"- {n}: {e[:300]}" for n, e in sorted(errors)[:20]]
            lines.append("")
    lines += [
        "Per-run result JSON (vLLM `bench serve` keys + per-request detail): `runs/`. "
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
            "failures": failures,
            "summary": {
                n: [{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in runs]
                for n, runs in results.items()
            },
        },
    )
    return path
