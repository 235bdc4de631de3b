"""`python -m loadtest run|sweep`: parse the command line and dispatch. Flag names follow
`vllm bench serve` where they exist; the workload flags both commands share live in
`loadtest.workload`."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys

from loadtest.bench import benchmark, detect_model, print_report, write_json
from loadtest.client import ENDPOINTS, ApiConfig
from loadtest.runner import RunConfig
from loadtest.sweep import run_sweep
from loadtest.sweep_config import SCHEDULES
from loadtest.uniqueness import PROMPT_UNIQUENESS
from loadtest.workload import add_workload_args, load_workload, report_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="benchmark one OpenAI-compatible server")
    a = run.add_argument
    a("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (default: --host/--port)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    a("--model", default=None, help="default: the first id in /v1/models")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    a("--request-rate", type=float, default=math.inf, help="req/s; inf = all at once")
    a("--result-file", help="write the result JSON here")
    a("--label", default="")
    add_workload_args(run)
    sweep = sub.add_parser("sweep", help="rate sweeps over configurations -> report dir")
    sweep.add_argument("--config", required=True, help="configs/sweeps/<name>.yaml")
    sweep.add_argument("--output-dir", help="default: loadtest/reports/<date>-<name>")
    sweep.add_argument("--rates", help="comma-separated, overrides the YAML's rates")
    sweep.add_argument("--only", help="comma-separated configuration names to run")
    sweep.add_argument(
        "--prompt-uniqueness",
        choices=PROMPT_UNIQUENESS,
        default=None,
        help="how each rate's prompts are made new to the server (default: the YAML's, "
        "else per_rate_prefix)",
    )
    sweep.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of every configuration x dataset x rate; reports and bars take the median "
        "(default: the YAML's, else 1)",
    )
    sweep.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="sequential: one server at a time; interleaved: every server up at once, each "
        "rate's runs back to back across configurations in rotated order (default: the "
        "YAML's, else sequential)",
    )
    add_workload_args(sweep, given_only=True)
    return parser


async def cmd_run(args: argparse.Namespace) -> int:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    model = args.model or await detect_model(base_url, args.api_key)
    api = ApiConfig(
        base_url,
        args.endpoint,
        model,
        args.ignore_eos,
        args.temperature,
        args.api_key,
        args.request_timeout,
    )
    cfg = RunConfig(
        api,
        args.request_rate,
        args.burstiness,
        args.max_concurrency,
        args.duration,
        args.drain_timeout,
        args.seed,
        not args.disable_tqdm,
    )
    rep = report_config(args, args.label)
    samples = load_workload(args)
    print(
        f"{len(samples)} prompts of {args.dataset_name} -> {api.url} (model {model}), "
        f"rate {args.request_rate}, burstiness {args.burstiness}, "
        f"max concurrency {args.max_concurrency}"
    )
    res = await benchmark(cfg, samples, rep)
    print_report(res)
    if args.result_file:
        res.result["command"] = " ".join(sys.argv)
        write_json(args.result_file, res.result)
        print(f"result JSON: {args.result_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return asyncio.run(cmd_run(args))
        return run_sweep(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
