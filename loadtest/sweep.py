"""`python -m loadtest sweep --config configs/sweeps/<name>.yaml`.

For each configuration: start `specd serve <serve_args>` (or `command`, any server with
{port}) on a free local port and wait until it is ready, or use its `base_url` ($VARS expand in
all three); send a few warm-up requests; for each dataset, run its prompts at every rate,
`repeats` times (each run's prompts made new to the server, see `loadtest.uniqueness`); save
each result JSON; stop the server. Then write report.md with tables and plots (medians over
the repeats). YAML keys named like the CLI flags (underscores) set the workload; a flag given
on the command line wins.

`schedule: interleaved` starts every configuration's server first (idle servers take memory,
not CPU) and then runs in rounds: for each dataset, rate and repeat, every configuration
once, in an order rotated each round (`run_order`). One configuration's runs are then
minutes, not an hour, from another's at the same rate, so a shared machine's drift over the
sweep (the same no-spec server moved 63% between two sequential sweeps) no longer reads as a
difference between policies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

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


def run_path(
    out_dir: Path,
    config: str,
    dataset: str,
    rate: float,
    multi_dataset: bool,
    repeat: int = 0,
    repeats: int = 1,
) -> Path:
    """runs/<config>/rate-<r>.json for a one-dataset sweep (the layout before multi-dataset
    sweeps), runs/<config>/<dataset>/rate-<r>.json otherwise; with repeats, one file per
    repeat: rate-<r>-rep<k>.json."""
    folder = out_dir / "runs" / config
    name = f"rate-{rate}" + (f"-rep{repeat}" if repeats > 1 else "")
    return (folder / dataset if multi_dataset else folder) / f"{name}.json"


def run_order(names: list[str], rate_index: int, repeat: int, repeats: int) -> list[str]:
    """The configurations of one interleaved round, rotated one place per round, so over a
    rate's repeats (and across rates) each configuration runs first, second, ... in turn:
    whatever the previous run left behind (a warm cache, a hot core) is shared out."""
    shift = (rate_index * repeats + repeat) % len(names)
    return names[shift:] + names[:shift]


@dataclass
class _Target:
    """A configuration's server, ready to measure."""

    conf: Configuration
    base_url: str
    # The process sweep started (None: a base_url configuration, already running).
    server: ServerProcess | None = None
    api: ApiConfig | None = None

    def save_metrics(self, out_dir: Path) -> None:
        if self.server is not None:
            save_final_metrics(self.base_url, out_dir / "metrics" / f"{self.conf.name}.prom")


class _Sweep:
    """The runs of one sweep; see the module docstring for the order of things."""

    def __init__(
        self,
        args: argparse.Namespace,
        sweep: SweepConfig,
        counter: TokenCounter,
        outcome: SweepOutcome,
        out_dir: Path,
    ) -> None:
        self.args = args
        self.sweep = sweep
        self.counter = counter
        self.outcome = outcome
        self.out_dir = out_dir

    async def prepare(self, target: _Target) -> None:
        """Finds the model name and sends the warm-up prompts."""
        args, sweep = self.args, self.sweep
        model = target.conf.model or await detect_model(target.base_url)
        target.api = ApiConfig(
            target.base_url,
            target.conf.endpoint or args.endpoint,
            model,
            args.ignore_eos,
            args.temperature,
            None,
            args.request_timeout,
        )
        if sweep.warmup_prompts:
            first = self.outcome.samples[sweep.datasets[0]][: sweep.warmup_prompts]
            short = [
                Sample(s.prompt, s.prompt_len, min(s.output_len, WARMUP_OUTPUT_LEN), s.category)
                for s in first
            ]
            prefixes = warmup_prefixes(sweep.prompt_uniqueness, len(short))
            await benchmark(
                RunConfig(target.api, max_concurrency=1, progress=False),
                with_prefixes(short, prefixes, self.counter),
                report_config(args),
            )

    async def measure(self, target: _Target, dataset: str, rate_index: int, repeat: int) -> None:
        """One run: the dataset's prompts (made new to the server) at one rate. The result
        lands in the outcome as soon as it exists, so a failure later keeps it."""
        args, sweep, conf = self.args, self.sweep, target.conf
        assert target.api is not None
        rate = sweep.rates[rate_index]
        base = self.outcome.samples[dataset]
        prefixes = run_prefixes(sweep.prompt_uniqueness, len(base), rate_index, dataset, repeat)
        cfg = RunConfig(
            target.api,
            rate,
            args.burstiness,
            conf.max_concurrency or args.max_concurrency,
            args.duration,
            args.drain_timeout,
            args.seed,
            not args.disable_tqdm,
        )
        title = f"{conf.name} / {dataset} @ {rate} req/s"
        if sweep.repeats > 1:
            title += f" (repeat {repeat + 1}/{sweep.repeats})"
        samples = with_prefixes(base, prefixes, self.counter)
        print(f"[{title}] {len(samples)} prompts -> {target.api.url}", flush=True)
        res: BenchResult = await benchmark(cfg, samples, report_config(args, conf.name, dataset))
        print(format_summary(res.summary, title), flush=True)
        res.result["configuration"] = conf.name
        res.result["repeat"] = repeat
        res.result["prompt_uniqueness"] = sweep.prompt_uniqueness
        res.result["prompt_prefixes"] = prefixes
        path = run_path(
            self.out_dir, conf.name, dataset, rate, sweep.multi_dataset, repeat, sweep.repeats
        )
        write_json(path, res.result)
        self.outcome.add(dataset, conf.name, res.result)

    async def all_runs_of(self, target: _Target) -> None:
        """Sequential: every dataset, rate and repeat against one server."""
        await self.prepare(target)
        for dataset in self.sweep.datasets:
            for rate_index in range(len(self.sweep.rates)):
                for repeat in range(self.sweep.repeats):
                    await self.measure(target, dataset, rate_index, repeat)

    async def interleaved(self, targets: list[_Target]) -> list[_Target]:
        """Every dataset, rate and repeat as rounds over all servers (``run_order``); a
        server that fails is dropped from later rounds. Returns those that never failed."""
        ready = []
        for t in targets:
            if await self._guarded(t, self.prepare(t)):
                ready.append(t)
        for dataset in self.sweep.datasets:
            for rate_index in range(len(self.sweep.rates)):
                for repeat in range(self.sweep.repeats):
                    by_name = {t.conf.name: t for t in ready}
                    order = run_order(list(by_name), rate_index, repeat, self.sweep.repeats)
                    for name in order:
                        t = by_name[name]
                        if not await self._guarded(t, self.measure(t, dataset, rate_index, repeat)):
                            ready.remove(t)
        return ready

    async def _guarded(self, target: _Target, work: Coroutine[Any, Any, None]) -> bool:
        try:
            await work
        except _RUN_ERRORS as e:
            tail = f"; log tail:\n{target.server.log_tail(8)}" if target.server else ""
            self.fail(target.conf.name, RuntimeError(f"{e}{tail}"))
            return False
        return True

    def fail(self, name: str, error: BaseException) -> None:
        self.outcome.failures[name] = str(error)
        print(f"[{name}] skipped: {error}", file=sys.stderr, flush=True)


# What stops one configuration without stopping the sweep.
_RUN_ERRORS = (RuntimeError, OSError, ValueError, httpx.HTTPError)


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
    runs = _Sweep(args, sweep, counter, outcome, out_dir)
    if sweep.schedule == "interleaved":
        _run_interleaved(runs)
    else:
        for conf in sweep.configurations:
            try:
                _run_configuration(conf, runs)
            except _RUN_ERRORS as e:
                runs.fail(conf.name, e)
    write_report(out_dir, sweep, args, outcome)
    print(f"report: {out_dir / 'report.md'}")
    return 0 if outcome.results else 1


def _server(conf: Configuration, runs: _Sweep) -> ServerProcess | None:
    """The process to start for ``conf`` (None: it is already running at its base_url);
    records the command line as run."""
    if conf.base_url:
        runs.outcome.launched[conf.name] = f"already running at {_base_url(conf)}"
        return None
    port = free_port()
    if conf.serve_args is not None:
        argv = specd_argv([os.path.expandvars(a) for a in conf.serve_args], port)
    else:
        assert conf.command is not None
        argv = command_argv([os.path.expandvars(a) for a in conf.command], port)
    unset = [a for a in argv if "$" in a]
    if unset:
        raise ValueError(f"environment variables not set in {unset} (see loadtest/PEERS.md)")
    log = runs.out_dir / "logs" / f"{conf.name}.log"
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in conf.env.items())
    runs.outcome.launched[conf.name] = env + shlex.join(argv).replace(sys.executable, "python")
    print(f"[{conf.name}] starting: {env}{shlex.join(argv)}", flush=True)
    return ServerProcess(argv, port, log, conf.startup_timeout_s, cwd=str(REPO_ROOT), env=conf.env)


def _base_url(conf: Configuration) -> str:
    assert conf.base_url is not None
    return os.path.expandvars(conf.base_url)


@contextlib.contextmanager
def _serving(conf: Configuration, runs: _Sweep) -> Iterator[_Target]:
    """``conf``'s server, started and ready (stopped on exit; a RuntimeError on the way
    carries its log tail), or its base_url when it is already running."""
    server = _server(conf, runs)
    if server is None:
        yield _Target(conf, _base_url(conf))
        return
    try:
        with server:
            yield _Target(conf, server.base_url, server)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; log tail:\n{server.log_tail(8)}") from e


def _run_configuration(conf: Configuration, runs: _Sweep) -> None:
    with _serving(conf, runs) as target:
        asyncio.run(runs.all_runs_of(target))
        target.save_metrics(runs.out_dir)


def _run_interleaved(runs: _Sweep) -> None:
    """Starts every configuration's server (one after the other: start-up profiles must not
    share the cores), then runs the rounds with all of them up."""
    with contextlib.ExitStack() as stack:
        targets = []
        for conf in runs.sweep.configurations:
            try:
                targets.append(stack.enter_context(_serving(conf, runs)))
            except _RUN_ERRORS as e:
                runs.fail(conf.name, e)
        for t in asyncio.run(runs.interleaved(targets)):
            t.save_metrics(runs.out_dir)


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
