"""`python -m loadtest run|sweep`. Flag names follow `vllm bench serve` where they exist."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys

from loadtest.bench import ReportConfig, benchmark, detect_model, print_report, write_json
from loadtest.client import ENDPOINTS, ApiConfig
from loadtest.data import DATASET_NAMES, load_samples
from loadtest.metrics import METRICS, parse_goodput
from loadtest.runner import RunConfig
from loadtest.tokens import make_counter


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `run` and `sweep` (a sweep YAML's keys override them)."""
    a = p.add_argument
    a("--dataset-name", default="mix", choices=DATASET_NAMES)
    a("--dataset-path", help="JSONL of {'prompt': ...} (repetitive/chat/mix) or ShareGPT JSON")
    a("--num-prompts", type=int, default=100)
    a(
        "--max-tokens",
        "--output-len",
        dest="max_tokens",
        type=int,
        default=None,
        help="output tokens per request (default: the dataset's, 128)",
    )
    a("--random-input-len", type=int, default=1024)
    a("--random-output-len", type=int, default=128)
    a("--random-range-ratio", type=float, default=0.0)
    a(
        "--tokenizer",
        help="HF dir, .gguf file or embedded model name for client-side counts "
        "(default: a regex estimate; the server's usage is used whenever it reports one)",
    )
    a("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    a("--max-concurrency", type=int, default=None)
    a("--seed", type=int, default=0)
    a("--ignore-eos", action="store_true")
    a("--temperature", type=float, default=0.0)
    a("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    a("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    a("--percentile-metrics", default="ttft,tpot,itl,e2el")
    a("--duration", type=float, default=None, help="send nothing after this many seconds")
    a(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="after --duration, seconds to let in-flight requests finish",
    )
    a("--request-timeout", type=float, default=300.0)
    a("--disable-tqdm", action="store_true")


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
    add_workload_args(sweep)
    return parser


def report_config(args: argparse.Namespace, label: str = "") -> ReportConfig:
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {bad}; choose from {METRICS}")
    percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    return ReportConfig(
        parse_goodput(args.goodput),
        percentiles,
        metrics,
        label,
        args.dataset_name,
        args.tokenizer or "approx",
    )


def load_workload(args: argparse.Namespace) -> list:
    counter = make_counter(args.tokenizer)
    return load_samples(
        args.dataset_name,
        args.num_prompts,
        counter,
        seed=args.seed,
        output_len=args.max_tokens,
        dataset_path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
    )


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
        from loadtest.sweep import run_sweep  # matplotlib and yaml only when sweeping

        return run_sweep(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
