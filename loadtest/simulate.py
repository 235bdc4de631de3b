"""`python -m loadtest.simulate`: predict latency vs request rate per speculation policy.

A discrete-event simulation (loadtest/sim/) of the real Scheduler, Speculator and policies on
a virtual clock, with a simulated runner and drafter and a "true" step-cost function:

    python -m loadtest.simulate --config configs/sims/h100-llama3-8b.yaml
    # -> loadtest/results/sim/<name>.json, <name>.png, <name>.md
    python -m loadtest.simulate --config configs/sims/smollm2-cpu.yaml \\
        --compare loadtest/reports/<date>-spec-policies
    # -> also <name>-compare.json / .md: simulated vs measured mean latency per rate, policy
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.bench import write_json
from loadtest.host import git_info, machine_info
from loadtest.sim.compare import (
    compare,
    compare_markdown,
    load_sweep_runs,
    sweep_rates,
)
from loadtest.sim.config import SimConfig, load_config
from loadtest.sim.plot import plot_results
from loadtest.sim.results import markdown
from loadtest.sim.sweep import run_config

DEFAULT_OUT = "loadtest/results/sim"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.simulate", description=__doc__)
    p.add_argument("--config", required=True, help="configs/sims/<name>.yaml")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--rates", help="comma-separated req/s (inf allowed), overrides the YAML")
    p.add_argument("--num-requests", type=int, help="requests per rate, overrides the YAML")
    p.add_argument("--policies", help="comma-separated, e.g. none,fixed:4,goodput")
    p.add_argument("--workloads", help="comma-separated workload names to run")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--cost-path",
        help="coefficients for a `coefficients` cost, overriding cost.path: a JSON, a /metrics "
        "scrape, or a sweep run JSON (its last coefficient sample: the model the server had "
        "fitted by the end of that run)",
    )
    p.add_argument(
        "--compare",
        metavar="REPORT_DIR",
        help="a `python -m loadtest sweep` report directory: simulate its rates (unless "
        "--rates) and write the relative error of the simulated mean latencies",
    )
    p.add_argument(
        "--sim-result",
        help="with --compare: an earlier simulation JSON to compare instead of simulating",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    runs = load_sweep_runs(Path(args.compare)) if args.compare else None
    rates = _parse_rates(args.rates) if args.rates else None
    if rates is None and runs:
        rates = sweep_rates(runs)
    config = config.with_overrides(
        rates=rates,
        num_requests=args.num_requests,
        policies=args.policies.split(",") if args.policies else None,
        seed=args.seed,
        workloads=args.workloads.split(",") if args.workloads else None,
        cost_path=args.cost_path,
    )
    command = "python -m loadtest.simulate " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.sim_result:
        doc = json.loads(Path(args.sim_result).read_text())
    else:
        doc = simulate_and_write(config, out, command)
    if runs is not None:
        rows = compare(doc["results"], runs, config.compare)
        md = compare_markdown(rows, args.compare, command)
        write_json(out / f"{config.name}-compare.json", {"command": command, "rows": rows})
        (out / f"{config.name}-compare.md").write_text(md)
        print(md)
    return 0


def simulate_and_write(config: SimConfig, out: Path, command: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    results = run_config(config, log=lambda line: print(line, flush=True))
    doc = {
        "name": config.name,
        "description": config.description,
        "command": command,
        "date": started,
        "wall_seconds": time.perf_counter() - t0,
        "git": git_info().get("commit"),
        "machine": machine_info(),
        "config_path": config.path,
        "config": config.to_dict(),
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{config.name}.json", doc)
    plot_results(results, config.name, out / f"{config.name}.png")
    (out / f"{config.name}.md").write_text(markdown(doc))
    print(f"wrote {out / config.name}.json, .png, .md ({doc['wall_seconds']:.0f} s)")
    return doc


def _parse_rates(text: str) -> tuple[float, ...]:
    return tuple(float("inf") if r.strip() == "inf" else float(r) for r in text.split(","))


if __name__ == "__main__":
    raise SystemExit(main())
