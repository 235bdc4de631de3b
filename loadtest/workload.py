"""What `run` and `sweep` share: the workload flags, their defaults, loading the prompts and
the report settings derived from the flags. Both the CLI and the sweep import this module, so
neither needs the other."""

from __future__ import annotations

import argparse
from typing import Any

from loadtest.bench import ReportConfig
from loadtest.data import DATASET_NAMES, load_samples
from loadtest.metrics import METRICS, parse_goodput
from loadtest.records import Sample
from loadtest.tokens import TokenCounter, make_counter


def add_workload_args(p: argparse.ArgumentParser, given_only: bool = False) -> None:
    """Flags shared by `run` and `sweep`. given_only (sweep): no defaults, so a flag is in the
    parsed namespace only when it was on the command line; `merge_workload` then lays the
    given flags over the YAML and the YAML over the defaults (a flag given with its default
    value still wins over the YAML)."""

    def a(*names: str, **kw: Any) -> None:
        if given_only:
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kw)

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


def workload_defaults() -> dict[str, Any]:
    """Every workload flag's default, keyed by its dest (the sweep YAML's key)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_workload_args(parser)
    return vars(parser.parse_args([]))


def percentiles(args: argparse.Namespace) -> tuple[float, ...]:
    return tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())


def report_config(
    args: argparse.Namespace, label: str = "", dataset_name: str | None = None
) -> ReportConfig:
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {bad}; choose from {METRICS}")
    return ReportConfig(
        parse_goodput(args.goodput),
        percentiles(args),
        metrics,
        label,
        dataset_name or args.dataset_name,
        args.tokenizer or "approx",
    )


def load_workload(
    args: argparse.Namespace,
    dataset_name: str | None = None,
    counter: TokenCounter | None = None,
) -> list[Sample]:
    """`args.num_prompts` samples of `dataset_name` (default: args.dataset_name)."""
    return load_samples(
        dataset_name or args.dataset_name,
        args.num_prompts,
        counter or make_counter(args.tokenizer),
        seed=args.seed,
        output_len=args.max_tokens,
        dataset_path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
    )
