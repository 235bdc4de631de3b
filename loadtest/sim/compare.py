"""Simulated against measured: the relative error of the simulator's mean latencies per rate
and policy, given a real sweep's report directory (``python -m loadtest sweep``:
runs/<config>/rate-<r>.json or runs/<config>/<dataset>/rate-<r>.json, `vllm bench serve`
keys such as mean_e2el_ms).

Sim policies map to sweep configurations by the config's ``compare.configurations`` (default:
the names of configs/sweeps/spec-policies.yaml), workloads to datasets by name (or the one to
the one, when both sides have a single one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = ("e2el", "ttft", "tpot")


def load_sweep_runs(report_dir: Path) -> list[dict[str, Any]]:
    """Every run JSON under report_dir/runs, each with its configuration, dataset and rate."""
    runs_dir = report_dir / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{report_dir}: no runs/ directory (not a sweep report?)")
    runs = []
    for path in sorted(runs_dir.glob("*/rate-*.json")) + sorted(runs_dir.glob("*/*/rate-*.json")):
        run = json.loads(path.read_text())
        config = path.relative_to(runs_dir).parts[0]
        runs.append(
            {
                **run,
                "configuration": run.get("configuration") or config,
                "dataset_name": run.get("dataset_name") or "default",
                "request_rate": _rate(run.get("request_rate")),
                "path": str(path),
            }
        )
    return runs


def sweep_rates(runs: list[dict[str, Any]]) -> tuple[float, ...]:
    return tuple(sorted({r["request_rate"] for r in runs}))


def compare(
    sim: dict[str, dict[str, list[dict[str, Any]]]],
    runs: list[dict[str, Any]],
    mapping: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per (workload, policy, rate) with a measured counterpart."""
    datasets = sorted({r["dataset_name"] for r in runs})
    index = {(r["configuration"], r["dataset_name"], r["request_rate"]): r for r in runs}
    rows = []
    for workload, by_policy in sim.items():
        dataset = workload
        if workload not in datasets and len(sim) == 1 and len(datasets) == 1:
            dataset = datasets[0]
        for policy, sim_runs in by_policy.items():
            config = mapping.get(policy, policy)
            for s in sim_runs:
                rate = _rate(s["request_rate"])
                real = index.get((config, dataset, rate))
                if real is None:
                    continue
                row: dict[str, Any] = {
                    "workload": workload,
                    "dataset": dataset,
                    "policy": policy,
                    "configuration": config,
                    "rate": s["request_rate"],
                    "real_completed": real.get("completed"),
                }
                for m in METRICS:
                    key = f"mean_{m}_ms"
                    sim_v, real_v = s.get(key), real.get(key)
                    row[f"sim_{key}"] = sim_v
                    row[f"real_{key}"] = real_v
                    row[f"rel_error_{m}"] = (
                        (sim_v - real_v) / real_v if sim_v is not None and real_v else None
                    )
                rows.append(row)
    return rows


def compare_markdown(rows: list[dict[str, Any]], report_dir: str, command: str) -> str:
    lines = [
        "# Simulated vs measured mean latency",
        "",
        f"Sweep: `{report_dir}`. Command: `{command}`",
        "",
        "Relative error = (simulated - measured) / measured, of the mean.",
        "",
        "| workload | policy (configuration) | rate | E2E sim / real ms | E2E err | "
        "TTFT err | TPOT err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['policy']} ({r['configuration']}) | {r['rate']} | "
            f"{r['sim_mean_e2el_ms']:.0f} / {r['real_mean_e2el_ms']:.0f} | "
            f"{_pct(r['rel_error_e2el'])} | {_pct(r['rel_error_ttft'])} | "
            f"{_pct(r['rel_error_tpot'])} |"
        )
    if not rows:
        lines.append("| (no simulated run has a measured counterpart) | | | | | | |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _rate(r: Any) -> float:
    if r is None or str(r).lower() in ("inf", "infinity"):
        return math.inf
    return float(r)
