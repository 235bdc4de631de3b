"""Intra-op threads and OpenMP waiting on this machine: the measurements behind --cpu-threads.

    python -m loadtest.bench_threads [--quantization int4 none] [--batch-sizes 1 8 32]
        [--new-tokens 64] [--out loadtest/results/engine]

Each configuration runs in its own process (libgomp reads its environment when torch loads):
the offline engine of the embedded model at each batch size (all requests at once, greedy,
ignore_eos), output tokens/s, once alone and once beside a busy neighbour (a Python loop
holding one core, as the API process does under load). Configurations: passive waiting
(what `specd serve` sets) with 1 and 2 threads, and bounded spinning (GOMP_SPINCOUNT=10000)
with 2 threads. Writes ``<out>/threads.{md,json}`` with the command, the machine and the load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtest.bench_engine import machine_info
from loadtest.host import format_loadavg, loadavg

# Every child imports `server`, which sets OMP_WAIT_POLICY=PASSIVE by default; libgomp takes
# an explicit GOMP_SPINCOUNT over the policy's spin count, so the last row spins.
CONFIGS = [
    ("passive, 1 thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    ("passive, 2 threads", {"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    ("spin 10000, 2 threads", {"GOMP_SPINCOUNT": "10000"}, 2),
]
_BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: sum(range(1000))"


def child(args: argparse.Namespace) -> None:
    """One configuration, in this process: prints a JSON line of tok/s per batch size."""
    from loadtest.bench_engine import chat_prompts
    from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from server.engine.offline import OfflineEngine
    from server.engine.sampling_params import SamplingParams
    from server.model.loader import resolve_model

    engine = OfflineEngine(
        EngineConfig(
            model=ModelConfig(
                model=str(resolve_model(args.model)),
                quantization=args.child_quantization,
                cpu_threads=args.child_threads,
            ),
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=max(args.batch_sizes)),
            separate_process=False,
        )
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for batch in args.batch_sizes:
        prompts = chat_prompts(engine.tokenizer, batch)
        engine.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))
        start = time.perf_counter()
        engine.generate(prompts, params)
        out[str(batch)] = round(batch * args.new_tokens / (time.perf_counter() - start), 1)
    print("RESULT " + json.dumps(out), flush=True)


def run_config(
    args: argparse.Namespace, quantization: str, env: dict, threads: int, busy: bool
) -> dict:
    neighbour = subprocess.Popen([sys.executable, "-c", _BUSY]) if busy else None
    try:
        cmd = [sys.executable, "-m", "loadtest.bench_threads", "--child"]
        cmd += ["--child-quantization", quantization, "--child-threads", str(threads)]
        cmd += ["--model", args.model, "--new-tokens", str(args.new_tokens), "--batch-sizes"]
        cmd += [str(b) for b in args.batch_sizes]
        clean = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        done = subprocess.run(
            cmd, env={**clean, **env}, capture_output=True, text=True, timeout=900
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"configuration failed: {done.stderr[-2000:]}")


def write_report(out_dir: Path, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    m, la = result["machine"], result["load_average"]
    batches = result["batch_sizes"]
    lines = [
        f"# Engine threads and OpenMP waiting, {m['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
        f"Load average at start: {format_loadavg(la['start'])}; at end: "
        f"{format_loadavg(la['end'])} (the busy neighbour adds 1 while it runs).",
        "",
        f"Offline engine, embedded model, {result['new_tokens']} new tokens per request, all "
        "requests at once; output tokens/s. 'beside a busy process': one Python loop holds a "
        "core, as the API process does under load.",
        "",
        "| weights | configuration | neighbour | "
        + " | ".join(f"batch {b}" for b in batches)
        + " |",
        "|---|---|---|" + "---:|" * len(batches),
    ]
    for row in result["rows"]:
        cells = " | ".join(f"{row['tok_s'][str(b)]:.1f}" for b in batches)
        lines.append(f"| {row['quantization']} | {row['config']} | {row['neighbour']} | {cells} |")
    lines.append("")
    path = out_dir / "threads.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantization", nargs="+", default=["int4", "none"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-quantization", default="int4", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    start = loadavg()
    rows = []
    for quantization in args.quantization:
        for name, env, threads in CONFIGS:
            for busy in (False, True):
                tok_s = run_config(args, quantization, env, threads, busy)
                neighbour = "beside a busy process" if busy else "alone"
                rows.append(
                    {
                        "quantization": quantization,
                        "config": name,
                        "neighbour": neighbour,
                        "tok_s": tok_s,
                    }
                )
                print(f"{quantization} {name} {neighbour}: {tok_s}", flush=True)
    result = {
        "command": "python -m loadtest.bench_threads " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": start, "end": loadavg()},
        "batch_sizes": args.batch_sizes,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    print(f"wrote {write_report(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
