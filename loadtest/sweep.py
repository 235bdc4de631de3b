"""`python -m loadtest sweep --config configs/sweeps/<name>.yaml`.

For each configuration: start `specd serve <serve_args>` (or `command`, any server with
{port}) on a free local port and wait until it is ready, or use its `base_url` ($VARS expand in
all three); send a few warm-up requests; for each dataset, run its prompts at every rate (each
run's prompts made new to the server, see `loadtest.uniqueness`); save each result JSON; stop
the server. Then write report.md with tables and plots. YAML keys named like the CLI flags
(underscores) set the workload; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from loadtest.bench import BenchResult, benchmark, detect_model, write_json
from loadtest.client import ApiConfig
from loadtest.host import REPO_ROOT, loadavg
from loadtest.metrics import format_summary
from loadtest.records import Sample
from loadtest.report import SweepOutcome, write_report
from loadtest.runner import RunConfig
from loadtest.server_proc import ServerProcess, command_argv, free_port, specd_argv
from loadtest.sweep_config import Configuration, SweepConfig, parse_sweep, resolve
from loadtest.tokens import TokenCounter, make_counter
from loadtest.uniqueness import run_prefixes, warmup_prefixes, with_prefixes
from loadtest.workload import load_workload, report_config

WARMUP_OUTPUT_LEN = 8


def run_path(out_dir: Path, config: str, dataset: str, rate: float, multi_dataset: bool) -> Path:
    """runs/<config>/rate-<r>.json for a one-dataset sweep (the layout before multi-dataset
    sweeps), runs/<config>/<dataset>/rate-<r>.json otherwise."""
    folder = out_dir / "runs" / config
    return (folder / dataset if multi_dataset else folder) / f"rate-{rate}.json"


async def _sweep_one(
    conf: Configuration,
    base_url: str,
    args: argparse.Namespace,
    sweep: SweepConfig,
    counter: TokenCounter,
    outcome: SweepOutcome,
    out_dir: Path,
) -> None:
    """Every dataset at every rate against one running server; each result lands in
    `outcome` as soon as it exists, so a failure later keeps the runs before it."""
    model = conf.model or await detect_model(base_url)
    api = ApiConfig(
        base_url,
        conf.endpoint or args.endpoint,
        model,
        args.ignore_eos,
        args.temperature,
        None,
        args.request_timeout,
    )
    if sweep.warmup_prompts:
        first = outcome.samples[sweep.datasets[0]][: sweep.warmup_prompts]
        short = [
            Sample(s.prompt, s.prompt_len, min(s.output_len, WARMUP_OUTPUT_LEN), s.category)
            for s in first
        ]
        warm = with_prefixes(short, warmup_prefixes(sweep.prompt_uniqueness, len(short)), counter)
        await benchmark(
            RunConfig(api, max_concurrency=1, progress=False), warm, report_config(args)
        )
    for dataset in sweep.datasets:
        base = outcome.samples[dataset]
        for rate_index, rate in enumerate(sweep.rates):
            prefixes = run_prefixes(sweep.prompt_uniqueness, len(base), rate_index, dataset)
            samples = with_prefixes(base, prefixes, counter)
            cfg = RunConfig(
                api,
                rate,
                args.burstiness,
                conf.max_concurrency or args.max_concurrency,
                args.duration,
                args.drain_timeout,
                args.seed,
                not args.disable_tqdm,
            )
            title = f"{conf.name} / {dataset} @ {rate} req/s"
            print(f"[{title}] {len(samples)} prompts -> {api.url}", flush=True)
            res: BenchResult = await benchmark(
                cfg, samples, report_config(args, conf.name, dataset)
            )
            print(format_summary(res.summary, title), flush=True)
            res.result["configuration"] = conf.name
            res.result["prompt_uniqueness"] = sweep.prompt_uniqueness
            res.result["prompt_prefixes"] = prefixes
            path = run_path(out_dir, conf.name, dataset, rate, sweep.multi_dataset)
            write_json(path, res.result)
            outcome.add(dataset, conf.name, res.result)


def run_sweep(args: argparse.Namespace) -> int:
    # Before anything else: the load average the machine had before this sweep added to it.
    loadavg_at_start = loadavg()
    started = time.time()
    path = Path(args.config)
    sweep, args = resolve(parse_sweep(yaml.safe_load(path.read_text()) or {}, path.stem), args)
    stamp = datetime.now().strftime("%Y-%m-%d")
    out_dir = Path(args.output_dir or REPO_ROOT / "loadtest" / "reports" / f"{stamp}-{sweep.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counter = make_counter(args.tokenizer)
    outcome = SweepOutcome(
        started=started,
        loadavg_at_start=loadavg_at_start,
        samples={d: load_workload(args, d, counter) for d in sweep.datasets},
    )
    for conf in sweep.configurations:
        try:
            _run_configuration(conf, args, sweep, counter, outcome, out_dir)
        except (RuntimeError, OSError, ValueError, httpx.HTTPError) as e:
            outcome.failures[conf.name] = str(e)
            print(f"[{conf.name}] skipped: {e}", file=sys.stderr, flush=True)
    write_report(out_dir, sweep, args, outcome)
    print(f"report: {out_dir / 'report.md'}")
    return 0 if outcome.results else 1


def _run_configuration(
    conf: Configuration,
    args: argparse.Namespace,
    sweep: SweepConfig,
    counter: TokenCounter,
    outcome: SweepOutcome,
    out_dir: Path,
) -> None:
    def sweep_one(url: str) -> None:
        asyncio.run(_sweep_one(conf, url, args, sweep, counter, outcome, out_dir))

    if conf.base_url:
        url = os.path.expandvars(conf.base_url)
        outcome.launched[conf.name] = f"already running at {url}"
        sweep_one(url)
        return
    port = free_port()
    if conf.serve_args is not None:
        argv = specd_argv([os.path.expandvars(a) for a in conf.serve_args], port)
    else:
        assert conf.command is not None
        argv = command_argv([os.path.expandvars(a) for a in conf.command], port)
    unset = [a for a in argv if "$" in a]
    if unset:
        raise ValueError(f"environment variables not set in {unset} (see loadtest/PEERS.md)")
    log = out_dir / "logs" / f"{conf.name}.log"
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in conf.env.items())
    outcome.launched[conf.name] = env + shlex.join(argv).replace(sys.executable, "python")
    print(f"[{conf.name}] starting: {env}{shlex.join(argv)}", flush=True)
    server = ServerProcess(
        argv, port, log, conf.startup_timeout_s, cwd=str(REPO_ROOT), env=conf.env
    )
    try:
        with server:
            sweep_one(server.base_url)
            save_final_metrics(server.base_url, out_dir / "metrics" / f"{conf.name}.prom")
    except RuntimeError as e:
        raise RuntimeError(f"{e}; log tail:\n{server.log_tail(8)}") from e


def save_final_metrics(base_url: str, path: Path) -> None:
    """The server's /metrics at the end of its runs (a specd server's fitted cost model and
    acceptance estimates are there, which the simulator can replay); skipped if it has none."""
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=10)
    except httpx.HTTPError:
        return
    if response.status_code == 200:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(response.text)
