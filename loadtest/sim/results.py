"""A run's summary in `vllm bench serve`'s result keys (so it lines up with the real sweeps'
runs/<config>/.../rate-<r>.json), and the markdown table of a simulation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtest.sim.engine import RunResult

PERCENTILES = (50, 90, 99)


def summarize(run: RunResult, rate: float) -> dict[str, Any]:
    """Latency stats (ms), throughput, the policy's budgets and predictions, sim overhead."""
    reqs = run.requests
    done = [r for r in reqs if not math.isnan(r.finish)]
    duration = max((r.finish for r in done), default=0.0)
    out_tokens = sum(r.num_output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    summary: dict[str, Any] = {
        "policy": run.policy,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(done),
        "failed": len(reqs) - len(done),
        "duration": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    for key, values in (
        ("ttft", [r.ttft for r in done]),
        ("tpot", [r.tpot for r in done if not math.isnan(r.tpot)]),
        ("e2el", [r.e2e for r in done]),
    ):
        summary.update(_stats(key, values))
    steps = run.steps
    budgets = [s.mean_budget for s in steps if not math.isnan(s.mean_budget)]
    predicted = np.array([s.predicted for s in steps if not math.isnan(s.predicted)])
    measured = np.array([s.seconds for s in steps if not math.isnan(s.predicted)])
    summary.update(
        {
            # As /metrics' specd:spec_decode_budget: over (request, step) pairs that could
            # speculate; mean_step_budget weighs every such step alike.
            "mean_budget": run.budget_sum / run.budget_count if run.budget_count else 0.0,
            "mean_step_budget": float(np.mean(budgets)) if budgets else 0.0,
            "acceptance": (
                run.num_accepted_tokens / run.num_draft_tokens if run.num_draft_tokens else 0.0
            ),
            "num_draft_tokens": run.num_draft_tokens,
            "num_accepted_tokens": run.num_accepted_tokens,
            "num_preemptions": run.num_preemptions,
            "num_steps": len(steps),
            "mean_step_ms": 1e3 * float(np.mean([s.seconds for s in steps])) if steps else 0.0,
            "mean_batch_size": float(np.mean([s.num_requests for s in steps])) if steps else 0.0,
            "mean_predicted_step_ms": 1e3 * float(predicted.mean()) if predicted.size else None,
            "cost_model_median_relative_error": (
                float(np.median(np.abs(predicted - measured) / measured))
                if predicted.size
                else None
            ),
            "sim_wall_s": run.wall_seconds,
            "sim_us_per_step": 1e6 * run.wall_seconds / len(steps) if steps else 0.0,
            "policy_us_per_step": 1e6 * run.policy_wall_seconds / len(steps) if steps else 0.0,
            "blocks_in_use_at_end": run.blocks_in_use,
        }
    )
    return summary


def _stats(key: str, values_s: Sequence[float]) -> dict[str, float]:
    if not values_s:
        return {f"mean_{key}_ms": 0.0} | {f"p{p}_{key}_ms": 0.0 for p in PERCENTILES}
    arr = 1e3 * np.asarray(values_s, dtype=np.float64)
    out = {f"mean_{key}_ms": float(arr.mean()), f"median_{key}_ms": float(np.median(arr))}
    out[f"std_{key}_ms"] = float(arr.std())
    for p in PERCENTILES:
        out[f"p{p}_{key}_ms"] = float(np.percentile(arr, p))
    return out


Results = dict[str, dict[str, list[dict[str, Any]]]]  # workload -> policy -> run per rate


def markdown(doc: dict[str, Any]) -> str:
    """The summary: provenance, then per workload a table of mean (p99) E2E latency, the mean
    chosen budget, and the simulator's own cost."""
    lines = [
        f"# Simulated latency vs request rate: {doc['name']}",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Date: {doc['date']}. Git: {doc.get('git') or '-'}. Config: `{doc['config_path']}`.",
        "",
        doc.get("description") or "",
        "",
        f"Simulated engine: the real Scheduler, Speculator and policies (make_policy), "
        f"drafter `{doc['config']['drafter']}`, num_speculative_tokens "
        f"{doc['config']['num_speculative_tokens']}, cost `{doc['config']['cost']['kind']}`; "
        f"requests per rate: {_counts(doc['config'])}.",
        "",
    ]
    for workload, by_policy in doc["results"].items():
        policies = list(by_policy)
        rates = [r["request_rate"] for r in next(iter(by_policy.values()))]
        lines += [f"## Workload `{workload}`", "", "Mean E2E latency, ms (p99 in brackets):", ""]
        lines += _table(rates, policies, by_policy, _latency_cell)
        lines += ["", "Mean chosen budget (draft tokens per request-step) / acceptance:", ""]
        lines += _table(rates, policies, by_policy, _budget_cell)
        lines += ["", "Mean TTFT / TPOT, ms:", ""]
        lines += _table(rates, policies, by_policy, _ttft_tpot_cell)
        lines += ["", "Simulator cost, µs of wall time per step (policy fill+observe in it):", ""]
        lines += _table(rates, policies, by_policy, _overhead_cell)
        best = _best_other(by_policy, rates)
        if best:
            lines += ["", *best]
        lines.append("")
    return "\n".join(lines)


def _table(rates: list[Any], policies: list[str], by_policy: dict, cell: Any) -> list[str]:
    out = ["| rate (req/s) | " + " | ".join(policies) + " |"]
    out.append("|---:|" + "---:|" * len(policies))
    for i, rate in enumerate(rates):
        out.append(f"| {rate} | " + " | ".join(cell(by_policy[p][i]) for p in policies) + " |")
    return out


def _latency_cell(r: dict[str, Any]) -> str:
    return f"{r['mean_e2el_ms']:.0f} ({r['p99_e2el_ms']:.0f})"


def _budget_cell(r: dict[str, Any]) -> str:
    return f"{r['mean_budget']:.2f} / {r['acceptance']:.2f}"


def _ttft_tpot_cell(r: dict[str, Any]) -> str:
    return f"{r['mean_ttft_ms']:.0f} / {r['mean_tpot_ms']:.2f}"


def _overhead_cell(r: dict[str, Any]) -> str:
    return f"{r['sim_us_per_step']:.0f} ({r['policy_us_per_step']:.0f})"


def _best_other(by_policy: dict[str, list[dict[str, Any]]], rates: list[Any]) -> list[str]:
    """Lines naming the rates where goodput's mean E2E is above the best other policy's."""
    if "goodput" not in by_policy or len(by_policy) < 2:
        return []
    out = []
    for i, rate in enumerate(rates):
        ours = by_policy["goodput"][i]["mean_e2el_ms"]
        name, best = min(
            ((p, runs[i]["mean_e2el_ms"]) for p, runs in by_policy.items() if p != "goodput"),
            key=lambda t: t[1],
        )
        if ours > best:
            out.append(
                f"- rate {rate}: goodput {ours:.0f} ms is {100 * (ours / best - 1):.1f}% above "
                f"the best other policy ({name}, {best:.0f} ms)"
            )
    return (
        ["Where goodput is not the best:", "", *out] if out else ["Goodput is best at every rate."]
    )


def _counts(config: dict[str, Any]) -> str:
    counts, rates = config["num_requests"], config["rates"]
    if len(counts) == 1:
        return str(counts[0])
    return ", ".join(f"{n} at {r}" for n, r in zip(counts, rates, strict=True))
