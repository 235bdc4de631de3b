"""Every (workload, policy, rate) of a config: the same trace per (workload, rate) for every
policy, one summary each, a progress line each."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from loadtest.sim.config import SimConfig
from loadtest.sim.cost import make_cost
from loadtest.sim.engine import simulate
from loadtest.sim.results import Results, summarize
from loadtest.sim.trace import make_trace


def run_config(config: SimConfig, log: Callable[[str], None] = print) -> Results:
    """workload -> policy label -> one summary per rate (in the config's order)."""
    results: Results = {}
    total = len(config.workloads) * len(config.policies) * len(config.rates)
    done = 0
    for w_index, workload in enumerate(config.workloads):
        by_policy: dict[str, list[dict[str, Any]]] = {p.label: [] for p in config.policies}
        for r_index, rate in enumerate(config.rates):
            stream = w_index * 1000 + r_index
            trace = make_trace(
                workload,
                rate,
                config.requests_at(r_index),
                config.seed,
                stream,
                config.burstiness,
            )
            for policy in config.policies:
                t0 = time.perf_counter()
                # A fresh cost per run: a noisy cost's draws restart with the same seed.
                cost = make_cost(config.cost, seed=config.seed * 7919 + stream)
                run = simulate(
                    trace, policy, config.engine, config.drafter, cost, profile=config.profile
                )
                summary = summarize(run, rate)
                by_policy[policy.label].append(summary)
                done += 1
                log(
                    f"[{done}/{total}] {workload.name} {policy.label:<17} rate {rate:g}: "
                    f"E2E mean {summary['mean_e2el_ms']:.0f} ms p99 "
                    f"{summary['p99_e2el_ms']:.0f} ms, budget {summary['mean_budget']:.2f}, "
                    f"acceptance {summary['acceptance']:.2f}, {summary['num_steps']} steps, "
                    f"{summary['policy_us_per_step']:.0f} µs policy/step, "
                    f"{time.perf_counter() - t0:.1f} s"
                )
        results[workload.name] = by_policy
    return results
