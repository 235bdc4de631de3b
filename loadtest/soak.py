"""A bounded soak: a real `specd serve` on loopback under mixed load, checked for leaks.

    python -m loadtest.soak [--model smollm2-135m-instruct] [--duration 600] [--concurrency 4]
        [--seed 0] [--out loadtest/results/soak/<date>] [--server-arg=--num-kv-blocks=512 ...]

`--concurrency` closed-loop users send a weighted mix (loadtest.soak_load: plain and streaming
completions and chat, n=2, streams the client closes early, bad requests) with speculation on,
until `--duration` ends. Every `--sample-interval` s: the server's RSS (its process and all its
children: the engine core is one) and its /metrics gauges, printed as a progress line. After
the load: wait for the server to go idle, read the KV blocks still in use (leaked: must be 0),
stop it. Writes soak.json, soak.md and soak.png (loadtest.soak_report) and exits non-zero when
a block leaked or any request failed unexpectedly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from loadtest import host, prom
from loadtest.server_proc import ServerProcess, free_port, specd_argv
from loadtest.soak_load import UNEXPECTED, KindPicker, LoadContext, PromptSource, Record, worker
from loadtest.soak_report import MIB, plot, render_markdown, summarize

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 4}'  # policy: goodput (default)
IDLE_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--model", default=DEFAULT_MODEL, help="what `specd serve --model` takes")
    a("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    a("--concurrency", type=int, default=4, help="closed-loop users (default 4)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, help="directory for the results (default loadtest/results/soak/<date>)")
    a(
        "--server-arg",
        action="append",
        default=[],
        help="extra `specd serve` arguments, split like a shell: --server-arg='--block-size 16'",
    )
    a("--max-model-len", type=int, default=512)
    a("--speculative-config", default=DEFAULT_SPEC, help="JSON; '' turns speculation off")
    a("--sample-interval", type=float, default=5.0, help="seconds between samples")
    a("--request-timeout", type=float, default=120.0, help="seconds a request may take")
    a("--windows", type=int, default=10, help="time windows of the latency table")
    a("--startup-timeout", type=float, default=600.0, help="seconds to wait for /ready")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.sample_interval <= 0:
        p.error("--duration and --sample-interval must be > 0 and --concurrency >= 1")
    return args


def serve_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--max-model-len", str(args.max_model_len)]
    out += ["--seed", str(args.seed)]
    if args.speculative_config:
        out += ["--speculative-config", args.speculative_config]
    return out + [tok for extra in args.server_arg for tok in shlex.split(extra)]


# --- what the server holds: RSS over its process tree, and /metrics ------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc/<pid>/task/<tid>/children (Linux)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except (OSError, ValueError):  # the thread or process just ended
                continue
    return out


def rss_bytes(pid: int) -> int | None:
    """VmRSS of one process, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None  # a zombie has no VmRSS line


def tree_rss(pid: int) -> tuple[int | None, list[dict[str, Any]]]:
    """Total RSS of `pid` and its descendants (shared pages count once per process), and
    each process's share."""
    procs = []
    for p in process_tree(pid):
        if (rss := rss_bytes(p)) is not None:
            try:
                name = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                name = "?"
            procs.append({"pid": p, "name": name, "rss_bytes": rss})
    return (sum(x["rss_bytes"] for x in procs) if procs else None), procs


async def scrape(client: httpx.AsyncClient) -> dict[str, Any]:
    """The /metrics series the soak watches; every value None when the scrape fails.
    `rejected`: specd:requests_rejected_total by reason (requests refused before the engine)."""
    names = {
        "kv_used": "num_kv_blocks_used",
        "kv_total": "num_kv_blocks_total",
        "running": "num_requests_running",
        "waiting": "num_requests_waiting",
        "draft_tokens": prom.DRAFTED,
        "accepted_tokens": prom.ACCEPTED,
    }
    try:
        r = await client.get("/metrics", timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError:
        return {**dict.fromkeys(names), "rejected": None}
    series = prom.parse_text(r.text)
    out: dict[str, Any] = {key: prom.metric_sum(series, suffix) for key, suffix in names.items()}
    out["rejected"] = {
        key.split('reason="', 1)[1].split('"', 1)[0]: v
        for key, v in series.items()
        if key.startswith("specd:requests_rejected_total{") and 'reason="' in key
    }
    return out


# --- the run -----------------------------------------------------------------------------


async def sample_loop(
    server: ServerProcess,
    client: httpx.AsyncClient,
    t0: float,
    records: list[Record],
    samples: list[dict[str, Any]],
    interval_s: float,
    done: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """A sample every `interval_s` until `done`; sets `stop` if the server dies."""
    assert server.proc is not None
    while True:
        rss, procs = tree_rss(server.proc.pid)
        metrics = await scrape(client)
        unexpected = sum(r.outcome in UNEXPECTED for r in records)
        s = {"t": round(time.perf_counter() - t0, 2), "rss_bytes": rss, "processes": procs}
        s |= {k: metrics[k] for k in ("kv_used", "kv_total", "running", "waiting")}
        s |= {"requests": len(records), "unexpected_errors": unexpected}
        samples.append(s)
        print(
            f"[{s['t']:6.0f} s] requests {len(records)}, unexpected errors {unexpected},"
            f" rss {'-' if rss is None else f'{rss / MIB:.0f} MiB'}, kv used {s['kv_used']},"
            f" running {s['running']}, waiting {s['waiting']}",
            flush=True,
        )
        if server.proc.poll() is not None:
            print(f"server exited with code {server.proc.returncode}: stopping", flush=True)
            stop.set()
            return
        try:
            await asyncio.wait_for(done.wait(), interval_s)
            return
        except asyncio.TimeoutError:
            continue


async def wait_idle(
    client: httpx.AsyncClient, timeout_s: float
) -> tuple[dict[str, Any], bool, float]:
    """Poll /metrics until nothing runs, waits or holds a KV block, or `timeout_s` passes.
    Returns the last scrape, whether nothing ran or waited, and the seconds waited."""
    start = time.perf_counter()
    while True:
        m = await scrape(client)
        idle = m["running"] == 0 and m["waiting"] == 0
        waited = time.perf_counter() - start
        if (idle and m["kv_used"] == 0) or waited >= timeout_s:
            return m, idle, waited
        await asyncio.sleep(0.5)


async def drive(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    client = httpx.AsyncClient(
        base_url=server.base_url, timeout=args.request_timeout, limits=limits
    )
    async with client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        records: list[Record] = []
        samples: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        picker = KindPicker(args.seed)
        ctx = LoadContext(client, model, PromptSource(), picker, t0, args.request_timeout)
        done, stop = asyncio.Event(), asyncio.Event()
        sampler = asyncio.create_task(
            sample_loop(server, client, t0, records, samples, args.sample_interval, done, stop)
        )
        deadline = t0 + args.duration
        await asyncio.gather(
            *(worker(ctx, i, args.seed, deadline, stop, records) for i in range(args.concurrency))
        )
        load_s = time.perf_counter() - t0
        done.set()
        await sampler
        metrics, idle, waited = await wait_idle(client, IDLE_TIMEOUT_S)
        assert server.proc is not None
        rss, procs = tree_rss(server.proc.pid)
        t = round(time.perf_counter() - t0, 2)
        final = {**metrics, "t": t, "rss_bytes": rss, "processes": procs}
    return {
        "records": records,
        "samples": samples,
        "final": final,
        "idle_reached": idle,
        "idle_wait_s": round(waited, 2),
        "load_s": round(load_s, 2),
        "model_id": model,
    }


def _spec_summary(final: dict[str, Any]) -> dict[str, float] | None:
    drafted, accepted = final.get("draft_tokens"), final.get("accepted_tokens")
    if not drafted or accepted is None:
        return None
    return {"draft_tokens": drafted, "accepted_tokens": accepted, "acceptance": accepted / drafted}


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    # Imports torch and the engine: only the report's provenance needs it.
    from loadtest.bench_engine import machine_info

    machine = machine_info()
    out: Path = args.out or host.REPO_ROOT / "loadtest/results/soak" / machine["date"][:10]
    out.mkdir(parents=True, exist_ok=True)
    loadavg_at_start = host.loadavg()
    port = free_port()
    argv = specd_argv(serve_args(args), port)
    print(f"soak: {args.duration:g} s, {args.concurrency} users -> {out}", flush=True)
    started = time.perf_counter()
    server = ServerProcess(argv, port, out / "server.log", startup_timeout_s=args.startup_timeout)
    with server:
        up_s = time.perf_counter() - started
        print(f"server up on {server.base_url} after {up_s:.0f} s", flush=True)
        run = asyncio.run(drive(server, args))
    assert server.proc is not None
    records: list[Record] = run["records"]
    final = run["final"]
    leaked = None if final["kv_used"] is None else int(final["kv_used"])
    summary = summarize(records, run["samples"], args.duration, args.windows)
    result: dict[str, Any] = {
        "command": " ".join(["python -m loadtest.soak", *([shlex.join(raw)] if raw else [])]),
        "config": {
            "model": args.model,
            "served_model": run["model_id"],
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "seed": args.seed,
            "sample_interval_s": args.sample_interval,
            "request_timeout_s": args.request_timeout,
            "serve_args": serve_args(args),
        },
        "machine": machine,
        "date_end": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": host.format_loadavg(loadavg_at_start),
        "loadavg_at_end": host.format_loadavg(host.loadavg()),
        "load_s": run["load_s"],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "server_exit_code": server.proc.returncode,
        "leaked_blocks": leaked,
        "idle_reached": run["idle_reached"],
        "idle_wait_s": run["idle_wait_s"],
        "final": final,
        "spec_decode": _spec_summary(final),
        **summary,
    }
    result["passed"] = leaked == 0 and result["unexpected_errors"] == 0
    result["samples"] = run["samples"]
    result["records"] = [r.to_json() for r in records]
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "soak.md").write_text(render_markdown(result))
    plot(result, out / "soak.png")
    mem = result["memory"]
    growth = mem.get("growth_bytes")
    print(
        f"{'PASS' if result['passed'] else 'FAIL'}: {len(records)} requests, errors"
        f" {result['errors']}, leaked blocks {leaked}, memory growth"
        f" {'-' if growth is None else f'{growth / MIB:+.1f} MiB'}, p99 drift"
        f" {result['latency']['p99_drift']} -> {out / 'soak.md'}",
        flush=True,
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
