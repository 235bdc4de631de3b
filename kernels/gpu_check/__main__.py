"""`python -m kernels.gpu_check [--dry-run] [--out PATH]`: every stage in order, the results
saved after each (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kernels import gpu_check
from kernels.gpu_check.engine_stages import (
    EngineHolder,
    stage_engine_decode,
    stage_engine_verify,
    stage_greedy_identity,
)
from kernels.gpu_check.environment import device_name, stage_environment
from kernels.gpu_check.int4_stages import (
    stage_int4_engine,
    stage_int4_linear,
    stage_speculation_identity,
)
from kernels.gpu_check.kernel_stages import stage_kernel_bench, stage_kernel_tests
from kernels.gpu_check.plan import REPO, Plan, make_plan
from kernels.gpu_check.report import default_out, write_results
from kernels.gpu_check.stages import Deadline, StageResult, log, run_stage


def prepare_environment(dry_run: bool) -> None:
    """TRITON_INTERPRET is read when triton is first imported, so it is settled first."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.pop("TRITON_INTERPRET", None) is not None:
        log("TRITON_INTERPRET was set: unset it, the kernels must be compiled on CUDA")
    if "triton" in sys.modules:
        log("warning: triton was imported before gpu_check set TRITON_INTERPRET")


def all_stages(
    plan: Plan, env: dict[str, Any], holder: EngineHolder
) -> list[tuple[StageResult, Callable[[StageResult, Deadline], None]]]:
    """Every stage in the order it runs: the 8B-shaped engines (dense, then int4 beside it)
    before the tiny models, so that their weights go in one piece."""
    return [
        (StageResult("environment", "info"), stage_environment(plan, env)),
        (StageResult("kernel-tests", "correctness"), stage_kernel_tests(plan)),
        (StageResult("kernel-bench", "performance"), stage_kernel_bench(plan, env)),
        (StageResult("engine-decode", "performance"), stage_engine_decode(plan, env, holder)),
        (StageResult("engine-verify", "performance"), stage_engine_verify(plan, env, holder)),
        (StageResult("int4-linear", "correctness"), stage_int4_linear(plan, env)),
        (StageResult("int4-engine", "performance"), stage_int4_engine(plan, env, holder)),
        (StageResult("greedy-identity", "correctness"), stage_greedy_identity(plan)),
        (StageResult("bf16-greedy", "correctness"), stage_speculation_identity(plan, "none")),
        (StageResult("int4-greedy", "correctness"), stage_speculation_identity(plan, "int4")),
    ]


# The stages in order: the plan budgets each one (its keys are in running order).
STAGE_NAMES = list(make_plan(dry_run=True).budgets)


def run_all(
    plan: Plan,
    env: dict[str, Any],
    save: Callable[[list[StageResult]], None],
    only: list[str] | None = None,
) -> list[StageResult]:
    """Every stage in order (``only``: those and the environment, whose bandwidth the floors
    use); `save` after each, so a run killed mid-way still leaves a file."""
    holder = EngineHolder(plan)
    stages = [
        (result, body)
        for result, body in all_stages(plan, env, holder)
        if only is None or result.name in ("environment", *only)
    ]
    results: list[StageResult] = []
    try:
        for i, (result, body) in enumerate(stages):
            if result.name == "greedy-identity":
                holder.close()  # the 8B weights go before the next model comes
            results.append(run_stage(result, plan.budgets[result.name], body))
            save(results)
            log(f"{i + 1}/{len(stages)} stages done")
    finally:
        holder.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kernels.gpu_check", description=gpu_check.__doc__.splitlines()[0]
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, temp results")
    ap.add_argument("--out", type=Path, help="results .md path (JSON beside it)")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=STAGE_NAMES[1:],
        metavar="STAGE",
        help=f"run these stages (and the environment) only: {', '.join(STAGE_NAMES[1:])}",
    )
    args = ap.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # tests.tiny_models, whatever the working directory
    prepare_environment(args.dry_run)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the code paths", file=sys.stderr)
        return 2
    plan = make_plan(args.dry_run)
    started = dt.datetime.now(dt.timezone.utc)
    out = args.out or default_out(plan, device_name(plan), started.date().isoformat())
    log(f"results go to {out} (JSON beside it); budget {sum(plan.budgets.values()):.0f} s")
    t0 = time.monotonic()
    env: dict[str, Any] = {"device": device_name(plan)}
    meta = {
        "command": shlex.join(["python", "-m", "kernels.gpu_check", *(argv or sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "dry_run": plan.dry_run,
        "complete": False,
        "seconds": 0.0,
        "environment": env,
        "plan": asdict(plan),
    }

    def save(results: list[StageResult]) -> None:
        meta["seconds"] = round(time.monotonic() - t0, 1)
        write_results(out, meta, results)

    results = run_all(plan, env, save, args.only)
    meta["complete"] = True
    save(results)
    failed = [r.name for r in results if r.status == "fail"]
    log(f"wrote {out} and {out.with_suffix('.json').name}; {meta['seconds']} s")
    log("FAILED: " + ", ".join(failed) if failed else "no stage failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
