"""`python -m loadtest sweep --config configs/sweeps/<name>.yaml`.

For each configuration: start `specd serve <serve_args>` (or `command`, any server with
{port}) on a free local port and wait for /health, or use its `base_url` ($VARS expand in
all three); send a few warm-up requests; run the same workload at every rate; save each
result JSON; stop the server. Then write report.md with tables and plots. YAML keys named
like the CLI flags (underscores) set the workload; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.bench import BenchResult, benchmark, detect_model, write_json
from loadtest.client import ApiConfig
from loadtest.metrics import format_summary
from loadtest.records import Sample
from loadtest.runner import RunConfig
from loadtest.server_proc import ServerProcess, command_argv, free_port, specd_argv

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Configuration:
    """One server setup to sweep. Exactly one of serve_args, command, base_url."""

    name: str
    serve_args: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    base_url: str | None = None
    model: str | None = None
    endpoint: str | None = None
    max_concurrency: int | None = None
    startup_timeout_s: float = 300.0
    # Extra environment for a started server (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU: "0").
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.serve_args, self.command, self.base_url)]
        if sum(given) != 1:
            raise ValueError(
                f"configuration {self.name!r}: give exactly one of serve_args (start specd), "
                "command (start another server, with {port}) or base_url (already running)"
            )


@dataclass(frozen=True)
class SweepConfig:
    name: str
    rates: tuple[float, ...]
    configurations: tuple[Configuration, ...]
    description: str = ""
    workload: dict[str, Any] = field(default_factory=dict)
    warmup_prompts: int = 2


def _rate(x: Any) -> float:
    if isinstance(x, str) and x.strip().lower() in ("inf", "infinity"):
        return math.inf
    r = float(x)
    if not r > 0:
        raise ValueError(f"rates must be > 0 or 'inf', got {x!r}")
    return r


def parse_sweep(data: dict[str, Any], fallback_name: str) -> SweepConfig:
    known = {"name", "description", "rates", "configurations", "warmup_prompts"}
    confs = []
    for c in data.get("configurations") or []:
        c = dict(c)
        for key in ("serve_args", "command"):
            if isinstance(c.get(key), str):
                c[key] = shlex.split(c[key])
            if c.get(key) is not None:
                c[key] = tuple(str(x) for x in c[key])
        c["env"] = {str(k): os.path.expandvars(str(v)) for k, v in (c.get("env") or {}).items()}
        try:
            confs.append(Configuration(**c))
        except TypeError as e:  # an unknown or missing key
            raise ValueError(f"configuration {c.get('name', '?')!r}: {e}") from e
    if not confs:
        raise ValueError("a sweep YAML needs a non-empty 'configurations' list")
    names = [c.name for c in confs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    rates = tuple(_rate(r) for r in data.get("rates") or ["inf"])
    return SweepConfig(
        name=str(data.get("name", fallback_name)),
        rates=rates,
        configurations=tuple(confs),
        description=str(data.get("description", "")),
        workload={k: v for k, v in data.items() if k not in known},
        warmup_prompts=int(data.get("warmup_prompts", 2)),
    )


def merge_workload(args: argparse.Namespace, workload: dict[str, Any]) -> argparse.Namespace:
    """YAML values replace flags still at their defaults; flags given explicitly win."""
    from loadtest.cli import build_parser

    defaults = vars(build_parser().parse_args(["sweep", "--config", "-"]))
    merged = argparse.Namespace(**vars(args))
    for key, value in workload.items():
        if key not in defaults:
            raise ValueError(f"unknown sweep YAML key {key!r}")
        if getattr(args, key) == defaults[key]:
            setattr(merged, key, value)
    return merged


async def _sweep_one(
    conf: Configuration,
    base_url: str,
    args: argparse.Namespace,
    sweep: SweepConfig,
    samples: list[Sample],
    out_dir: Path,
) -> list[dict[str, Any]]:
    from loadtest.cli import report_config

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
        warm = [
            Sample(s.prompt, s.prompt_len, min(s.output_len, 8), s.category)
            for s in samples[: sweep.warmup_prompts]
        ]
        await benchmark(
            RunConfig(api, max_concurrency=1, progress=False), warm, report_config(args)
        )
    results = []
    for rate in sweep.rates:
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
        print(f"[{conf.name}] rate {rate} req/s: {len(samples)} prompts -> {api.url}", flush=True)
        res: BenchResult = await benchmark(cfg, samples, report_config(args, conf.name))
        print(format_summary(res.summary, f"{conf.name} @ {rate} req/s"), flush=True)
        res.result["configuration"] = conf.name
        write_json(out_dir / "runs" / conf.name / f"rate-{rate}.json", res.result)
        results.append(res.result)
    return results


def run_sweep(args: argparse.Namespace) -> int:
    from loadtest.cli import load_workload
    from loadtest.report import write_report

    path = Path(args.config)
    sweep = parse_sweep(yaml.safe_load(path.read_text()) or {}, path.stem)
    wl = dict(sweep.workload)
    endpoint = wl.pop("endpoint", "/v1/completions")
    args = merge_workload(args, wl)
    args.endpoint = endpoint
    rates = tuple(_rate(r) for r in args.rates.split(",")) if args.rates else sweep.rates
    only = set(args.only.split(",")) if args.only else None
    confs = tuple(c for c in sweep.configurations if only is None or c.name in only)
    sweep = SweepConfig(
        sweep.name, rates, confs, sweep.description, sweep.workload, sweep.warmup_prompts
    )
    stamp = datetime.now().strftime("%Y-%m-%d")
    out_dir = Path(args.output_dir or REPO_ROOT / "loadtest" / "reports" / f"{stamp}-{sweep.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = load_workload(args)
    started = time.time()
    all_results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    launched: dict[str, str] = {}  # name -> the command line as run ($VARS expanded)
    for conf in sweep.configurations:
        try:
            all_results[conf.name] = _run_configuration(
                conf, args, sweep, samples, out_dir, launched
            )
        except (RuntimeError, OSError, ValueError, httpx.HTTPError) as e:
            failures[conf.name] = str(e)
            print(f"[{conf.name}] skipped: {e}", file=sys.stderr, flush=True)
    write_report(out_dir, sweep, args, all_results, failures, launched, started, samples)
    print(f"report: {out_dir / 'report.md'}")
    return 0 if all_results else 1


def _run_configuration(
    conf: Configuration,
    args: argparse.Namespace,
    sweep: SweepConfig,
    samples: list[Sample],
    out_dir: Path,
    launched: dict[str, str],
) -> list[dict[str, Any]]:
    if conf.base_url:
        url = os.path.expandvars(conf.base_url)
        launched[conf.name] = f"already running at {url}"
        return asyncio.run(_sweep_one(conf, url, args, sweep, samples, out_dir))
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
    launched[conf.name] = env + shlex.join(argv).replace(sys.executable, "python")
    print(f"[{conf.name}] starting: {env}{shlex.join(argv)}", flush=True)
    server = ServerProcess(
        argv, port, log, conf.startup_timeout_s, cwd=str(REPO_ROOT), env=conf.env
    )
    try:
        with server:
            return asyncio.run(_sweep_one(conf, server.base_url, args, sweep, samples, out_dir))
    except RuntimeError as e:
        raise RuntimeError(f"{e}; log tail:\n{server.log_tail(8)}") from e
