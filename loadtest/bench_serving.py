"""Does the serving path keep up with the engine? The same workload offline and over HTTP.

    python -m loadtest.bench_serving [--model smollm2-135m-instruct] [--max-tokens 64]
        [--dataset chat] [--requests-per-cell 64] [--concurrency 1 8 32]
        [--rate-fraction 0.7] [--speculative-config JSON] [--serve-arg='--flag value' ...]
        [--out loadtest/results/serving]

Each cell runs one workload twice, back to back, never both at once (they share the cores):
(a) offline, on an engine core in this process driven step by step (no HTTP, no second
process), and (b) through a live ``specd serve`` over HTTP with streaming (SSE), the way a
real client sees it. Same model, same engine settings (the serve arguments are parsed by
specd's own CLI to build the offline engine's config), same prompt token ids (sent as token
ids to /v1/completions), same max_tokens, greedy, ignore_eos, so output lengths match.

Cells: closed loop at each ``--concurrency`` (N clients, each sending its next request when
its previous one finishes; offline: N requests in the engine at all times), then one open
loop with Poisson arrivals at ``--rate-fraction`` of saturation, where saturation is the
offline tokens/s at the largest concurrency divided by the tokens per request; the offline
side replays the served side's arrival times (same seed).

Per cell: served tokens/s / offline tokens/s (target >= 0.9), served median TPOT / offline
median per-token time (TPOT per request = (e2e - ttft) / (tokens - 1)), and median TTFT and
E2E of both. Writes ``<out>/<date>.{json,md,png}`` with the command, the machine and the load
average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.arrivals import send_times
from loadtest.bench_engine import machine_info
from loadtest.bench_spec import DATASET_FILES, encode_chat, load_prompts
from loadtest.host import format_loadavg, loadavg
from loadtest.records import Sample
from loadtest.runner import RunConfig, run_benchmark
from loadtest.server_proc import ServerProcess, free_port, specd_argv
from server.cli import build_parser, config_from_args
from server.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams

TARGET_RATIO = 0.9
_SEED = 0


@dataclass(frozen=True)
class Cell:
    """One load shape: closed loop with `concurrency` clients, or open loop at `rate` req/s."""

    name: str
    concurrency: int | None = None
    rate: float | None = None


@dataclass(frozen=True)
class Done:
    """One finished request as either side saw it (seconds; ttft and e2e from its send)."""

    ok: bool
    ttft: float
    e2e: float
    tokens: int

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.ok and self.tokens > 1 else None


@dataclass(frozen=True)
class Side:
    """One side of a cell, summarised."""

    requests: int
    failed: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    median_ttft_s: float
    median_tpot_s: float
    median_e2e_s: float
    output_lens: list[int]
    loadavg_before: list[float] | None
    cpu_pressure_before: float | None


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu "some" avg10: % of the last 10 s some task waited for a CPU. On a VM
    whose host is shared this shows contention that the load average does not."""
    try:
        fields = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()
        return float(dict(f.split("=") for f in fields[1:])["avg10"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def summarise(
    done: list[Done],
    seconds: float,
    load_before: Sequence[float] | None,
    pressure_before: float | None = None,
) -> Side:
    ok = [d for d in done if d.ok]
    tpots = [t for d in ok if (t := d.tpot) is not None]
    tokens = sum(d.tokens for d in ok)

    def median(xs: list[float]) -> float:
        return statistics.median(xs) if xs else math.nan

    return Side(
        requests=len(done),
        failed=len(done) - len(ok),
        output_tokens=tokens,
        seconds=round(seconds, 4),
        tokens_per_s=round(tokens / seconds, 3) if seconds > 0 else math.nan,
        median_ttft_s=median([d.ttft for d in ok]),
        median_tpot_s=median(tpots),
        median_e2e_s=median([d.e2e for d in ok]),
        output_lens=sorted({d.tokens for d in ok}),
        loadavg_before=list(load_before) if load_before else None,
        cpu_pressure_before=pressure_before,
    )


# --- offline: the engine core in this process ------------------------------------------------


@dataclass
class _Live:
    start: float
    first: float | None = None
    tokens: int = 0


class OfflineDriver:
    """Drives an EngineCore step by step so that requests can join between steps, as they
    join the server's engine loop: closed loop (a finished request's slot is refilled at once)
    or open loop (requests are added once their arrival time has passed)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._next_id = 0

    def run(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        concurrency: int | None = None,
        arrivals: Sequence[float] | None = None,
    ) -> tuple[list[Done], float]:
        """Every prompt once; returns the requests in prompt order and the cell's seconds
        (start to the last finish)."""
        if (concurrency is None) == (arrivals is None):
            raise ValueError("give either concurrency (closed loop) or arrivals (open loop)")
        t0 = time.perf_counter()
        live: dict[str, tuple[int, _Live]] = {}
        done: dict[int, Done] = {}
        next_i = 0

        def add(i: int, start: float) -> None:
            rid = f"bench-{self._next_id}"
            self._next_id += 1
            live[rid] = (i, _Live(start))
            if (rejected := self.core.add_request(rid, prompts[i], params)) is not None:
                del live[rid]
                done[i] = Done(False, 0.0, 0.0, 0)
                print(f"  offline request {i} rejected: {rejected.error}", flush=True)

        def refill(now: float) -> None:
            """Closed loop: top the engine up to `concurrency` (a rejected prompt's slot goes
            to the next prompt at once)."""
            nonlocal next_i
            while concurrency is not None and next_i < len(prompts) and len(live) < concurrency:
                add(next_i, now)
                next_i += 1

        refill(0.0)
        end = 0.0
        while len(done) < len(prompts):
            if not self.core.has_unfinished and (arrivals is None or next_i == len(prompts)):
                raise RuntimeError("offline engine idle with requests unaccounted for")
            if arrivals is not None:
                now = time.perf_counter() - t0
                while next_i < len(prompts) and arrivals[next_i] <= now:
                    # The request arrived at its scheduled time, even if a step was running:
                    # waiting for that step is part of its latency, as on the server.
                    add(next_i, float(arrivals[next_i]))
                    next_i += 1
                if not self.core.has_unfinished:
                    if next_i < len(prompts):
                        time.sleep(max(0.0, arrivals[next_i] - now))
                    continue
            outputs = self.core.step()
            now = time.perf_counter() - t0
            for out in outputs:
                i, req = live[out.request_id]
                if out.new_token_ids and req.first is None:
                    req.first = now
                req.tokens += len(out.new_token_ids)
                if not out.finished:
                    continue
                del live[out.request_id]
                first = req.first if req.first is not None else now
                ok = out.error is None and req.tokens > 0
                done[i] = Done(ok, first - req.start, now - req.start, req.tokens)
                end = now
                refill(now)
        return [done[i] for i in range(len(prompts))], end


# --- served: a live `specd serve` over HTTP ----------------------------------------------------


def served_model_name(base_url: str) -> str:
    """The name the server answers to (an embedded model's name or the path it was given)."""
    data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0).json()
    return str(data["data"][0]["id"])


def run_served(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int | None = None,
    rate: float | None = None,
) -> tuple[list[Done], float]:
    """The load tool's runner (streamed /v1/completions, timed per chunk) with token-id
    prompts: closed loop = infinite rate under a concurrency cap, open loop = Poisson."""
    from loadtest.client import ApiConfig

    api = ApiConfig(base_url=base_url, model=model, ignore_eos=True, temperature=0.0)
    cfg = RunConfig(
        api=api,
        request_rate=math.inf if rate is None else rate,
        max_concurrency=concurrency,
        seed=_SEED,
        progress=False,
        # One /metrics scrape before and after the cell, none during it (no extra API load).
        metrics_interval_s=3600.0,
    )
    # /v1/completions takes a list of token ids as the prompt: the same ids as offline
    # (build_payload passes Sample.prompt through as it is).
    samples = [
        Sample(prompt=p, prompt_len=len(p), output_len=max_tokens)  # type: ignore[arg-type]
        for p in prompts
    ]
    out = asyncio.run(run_benchmark(cfg, samples))
    done = [Done(r.success, r.ttft, r.latency, r.output_len) for r in out.records]
    for r in out.records:
        if not r.success:
            print(f"  served request {r.index} failed: {r.error}", flush=True)
    return done, out.duration


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Bench:
    """Both sides, ready: the offline engine core and the server's URL and model name."""

    driver: OfflineDriver
    base_url: str
    model: str
    max_tokens: int

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)

    def offline(
        self, prompts: list[list[int]], cell: Cell, arrivals: Sequence[float] | None = None
    ) -> Side:
        load, pressure = loadavg(), cpu_pressure()
        done, seconds = self.driver.run(prompts, self.params, cell.concurrency, arrivals)
        return summarise(done, seconds, load, pressure)

    def served(self, prompts: list[list[int]], cell: Cell) -> Side:
        load, pressure = loadavg(), cpu_pressure()
        done, seconds = run_served(
            self.base_url, self.model, prompts, self.max_tokens, cell.concurrency, cell.rate
        )
        return summarise(done, seconds, load, pressure)


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b and not math.isnan(a) and not math.isnan(b) else math.nan


def cell_row(cell: Cell, offline: Side, served: Side) -> dict[str, Any]:
    return {
        "cell": cell.name,
        "concurrency": cell.concurrency,
        "rate_req_s": cell.rate,
        "offline": asdict(offline),
        "served": asdict(served),
        "throughput_ratio": ratio(served.tokens_per_s, offline.tokens_per_s),
        "tpot_ratio": ratio(served.median_tpot_s, offline.median_tpot_s),
        "ttft_ratio": ratio(served.median_ttft_s, offline.median_ttft_s),
    }


def run_cell(
    bench: Bench, prompts: list[list[int]], cell: Cell, index: int, total: int
) -> dict[str, Any]:
    """Both sides of one cell, back to back; which goes first alternates from cell to cell so
    that slow drift of a shared machine does not always land on the same side."""
    print(f"[{index + 1}/{total}] {cell.name}: {len(prompts)} requests", flush=True)
    arrivals = None
    if cell.rate is not None:
        arrivals = send_times(len(prompts), cell.rate, 1.0, _SEED).tolist()
    sides: dict[str, Side] = {}
    order = ("offline", "served") if index % 2 == 0 else ("served", "offline")
    for side in order:
        if side == "offline":
            sides[side] = bench.offline(prompts, cell, arrivals)
        else:
            sides[side] = bench.served(prompts, cell)
        s = sides[side]
        print(
            f"  {side:8s} {s.tokens_per_s:8.1f} tok/s  TPOT {1e3 * s.median_tpot_s:7.1f} ms  "
            f"TTFT {1e3 * s.median_ttft_s:7.1f} ms  ({s.failed} failed)",
            flush=True,
        )
    row = cell_row(cell, sides["offline"], sides["served"])
    print(
        f"  served/offline: tokens/s {row['throughput_ratio']:.3f}, TPOT {row['tpot_ratio']:.3f}",
        flush=True,
    )
    return row


def warm_up(bench: Bench, prompts: list[list[int]], concurrency: int) -> None:
    """One closed-loop pass at the largest concurrency on each side: first calls, batch
    shapes and (server) connection set-up happen here, not in the first measured cell."""
    if not prompts:
        return
    bench.driver.run(prompts, bench.params, concurrency=concurrency)
    run_served(bench.base_url, bench.model, prompts, bench.max_tokens, concurrency=concurrency)
    print(f"warmed up both sides ({len(prompts)} requests at c={concurrency})", flush=True)


def offline_config(serve_args: Sequence[str]) -> EngineConfig:
    """The engine config `specd serve <serve_args>` would run, in this process."""
    args = build_parser().parse_args(["serve", *serve_args])
    return replace(config_from_args(args).engine, separate_process=False)


def serve_args_from(opts: argparse.Namespace) -> list[str]:
    args = ["--model", opts.model]
    if opts.speculative_config:
        args += ["--speculative-config", opts.speculative_config]
    return args + [tok for extra in opts.serve_arg for tok in shlex.split(extra)]


def run(opts: argparse.Namespace, command: str) -> dict[str, Any]:
    serve_args = serve_args_from(opts)
    load_start, pressure_start = loadavg(), cpu_pressure()
    config = offline_config(serve_args)
    engine = OfflineEngine(config)
    texts = load_prompts(DATASET_FILES[opts.dataset], max(opts.requests_per_cell, 1))
    prompts = encode_chat(engine, texts)
    top = max(opts.concurrency)
    log = Path(tempfile.mkdtemp(prefix="bench-serving-")) / "server.log"
    port = free_port()
    print(f"starting specd serve {shlex.join(serve_args)} (log: {log})", flush=True)
    proc = ServerProcess(specd_argv(serve_args, port), port, log, opts.startup_timeout)
    with proc as server:
        bench = Bench(
            OfflineDriver(engine.core), server.base_url, served_model_name(server.base_url),
            opts.max_tokens,
        )  # fmt: skip
        warm = (prompts * (opts.warmup_requests // len(prompts) + 1))[: opts.warmup_requests]
        warm_up(bench, warm, top)
        cells = [Cell(f"closed c={c}", concurrency=c) for c in opts.concurrency]
        total = len(cells) + (1 if opts.rate_fraction > 0 else 0)
        rows = [run_cell(bench, prompts, c, i, total) for i, c in enumerate(cells)]
        saturation = None
        if opts.rate_fraction > 0:
            top_row = next(r for r in rows if r["concurrency"] == top)
            saturation = top_row["offline"]["tokens_per_s"] / opts.max_tokens
            rate = round(opts.rate_fraction * saturation, 4)
            cell = Cell(f"poisson {opts.rate_fraction:g}x sat ({rate:g} req/s)", rate=rate)
            rows.append(run_cell(bench, prompts, cell, len(cells), total))
    return {
        "command": command,
        "machine": machine_info(),
        "loadavg_before": list(load_start) if load_start else None,
        "loadavg_after": list(la) if (la := loadavg()) else None,
        "cpu_pressure_before": pressure_start,
        "cpu_pressure_after": cpu_pressure(),
        "model": opts.model,
        "serve_args": serve_args,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # What both sides ran (the server parses the same arguments into the same tree).
        "engine_config": asdict(config),
        "dataset": opts.dataset,
        "max_tokens": opts.max_tokens,
        "requests_per_cell": opts.requests_per_cell,
        "warmup_requests": opts.warmup_requests,
        "saturation_req_s": saturation,
        "target_throughput_ratio": TARGET_RATIO,
        "cells": rows,
    }


# --- the report --------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{1e3 * x:.1f}"


def _r(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def markdown(result: dict[str, Any], plot_name: str) -> str:
    m = result["machine"]
    sat = result["saturation_req_s"]
    lines = [
        f"# Serving path vs offline engine, {m['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} "
        f"threads), Python {m['python']}, commit {m['git_commit']}; load average before "
        f"{format_loadavg(result['loadavg_before'])}, after "
        f"{format_loadavg(result['loadavg_after'])}; CPU pressure (some, avg10) before "
        f"{result['cpu_pressure_before']}%, after {result['cpu_pressure_after']}%.",
        "",
        f"Model {result['model']}, serve args `{shlex.join(result['serve_args'])}` (the offline "
        f"engine gets the same config); {result['dataset']} prompts (chat template, sent as "
        f"token ids), {result['max_tokens']} tokens per request, greedy, ignore_eos; "
        f"{result['requests_per_cell']} requests per cell after {result['warmup_requests']} "
        "warm-up requests on each side. Served: streamed /v1/completions over HTTP; offline: "
        "the engine core stepped in one process. The client runs on this machine too: its CPU "
        "time is part of the served side's cost."
        + (f" Saturation (offline, largest concurrency): {sat:.3f} req/s." if sat else ""),
        "",
        f"![served / offline per cell]({plot_name})",
        "",
        f"Target: served tokens/s / offline tokens/s >= {result['target_throughput_ratio']}. "
        "TPOT is the median over requests of (e2e - ttft) / (tokens - 1); times in ms.",
        "",
        "| cell | offline tok/s | served tok/s | tok/s ratio | offline TPOT | served TPOT "
        "| TPOT ratio | offline TTFT | served TTFT | failed (off/srv) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["cells"]:
        o, s = row["offline"], row["served"]
        mark = "" if row["throughput_ratio"] >= result["target_throughput_ratio"] else " ✗"
        lines.append(
            f"| {row['cell']} | {o['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
            f"{_r(row['throughput_ratio'])}{mark} | {_ms(o['median_tpot_s'])} | "
            f"{_ms(s['median_tpot_s'])} | {_r(row['tpot_ratio'])} | {_ms(o['median_ttft_s'])} | "
            f"{_ms(s['median_ttft_s'])} | {o['failed']}/{s['failed']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    cells = result["cells"]
    names = [r["cell"].split(" (")[0] for r in cells]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["throughput_ratio"] for r in cells], color="tab:blue")
    a.axhline(result["target_throughput_ratio"], color="red", linestyle="--", label="target")
    a.set_title("served tokens/s / offline tokens/s (higher is better)")
    a.legend()
    b.bar(names, [r["tpot_ratio"] for r in cells], color="tab:orange")
    b.axhline(1 / result["target_throughput_ratio"], color="red", linestyle="--", label="1/0.9")
    b.set_title("served TPOT / offline TPOT, median (lower is better)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    png = out / f"{stamp}.png"
    plot(result, png)
    md = out / f"{stamp}.md"
    md.write_text(markdown(result, png.name))
    return md


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dataset", choices=sorted(DATASET_FILES), default="free-form")
    ap.add_argument("--requests-per-cell", type=int, default=64)
    ap.add_argument("--warmup-requests", type=int, default=None, help="default: max concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--rate-fraction",
        type=float,
        default=0.7,
        help="Poisson cell's rate / saturation (0: none)",
    )
    ap.add_argument("--speculative-config", help="JSON, given to both sides (as specd serve)")
    ap.add_argument(
        "--serve-arg",
        "--server-arg",
        dest="serve_arg",
        action="append",
        default=[],
        help="extra `specd serve` arguments, split like a shell (as loadtest.soak's), also "
        "parsed into the offline engine's config: --serve-arg='--max-num-seqs 16'",
    )
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/serving"))
    opts = ap.parse_args(argv)
    if opts.warmup_requests is None:
        opts.warmup_requests = max(opts.concurrency)
    if min(opts.concurrency) < 1 or opts.requests_per_cell < 1 or opts.max_tokens < 2:
        ap.error("need concurrency >= 1, --requests-per-cell >= 1 and --max-tokens >= 2")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(args)
    result = run(opts, "python -m loadtest.bench_serving " + shlex.join(args))
    print(f"wrote {write_report(opts.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
