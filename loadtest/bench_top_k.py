"""The target's top-k next tokens and their probabilities (what Token Recycling records at every
row a step computes): torch's topk + logsumexp against specd's AVX2 kernel, side by side.

    python -m loadtest.bench_top_k [--rows 1 8 9 32 72] [--vocab 49152] [--k 8]
        [--kernel-threads 0] [--out loadtest/results/engine]

Rows: 1 and 8 are plain decode steps at batch 1 and 8, 9 and 72 the same batches verifying
9-node trees. Logits are random rows of the embedded model's vocabulary size, rotated over
copies so they come from memory as a step's fresh logits do; ms per call, min of rounds.
torch runs on the engine's torch threads (``--cpu-threads``, 0 = cores - 1) and the kernel on
specd's kernel threads (``--kernel-threads``, 0 = every usable core), as the engine runs them.

Writes ``<out>/top-k.md`` (and .json) with the command, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loadtest.bench_engine import machine_info, report_header
from loadtest.host import loadavg
from server.model import int4_avx2, top_k_cpu
from server.model.cpu_threads import apply_cpu_threads, apply_kernel_threads

_COPIES = 4


def best_ms(fn: Callable[[torch.Tensor], object], xs: list[torch.Tensor], rounds: int) -> float:
    """ms per call, min over rounds of one call per copy."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for x in xs:
            fn(x)
        best = min(best, (time.perf_counter() - start) / len(xs))
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 9, 32, 72])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--kernel-threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)
    load_start = loadavg()
    torch_threads = apply_cpu_threads(args.cpu_threads)
    kernel_threads = apply_kernel_threads(args.kernel_threads)
    if top_k_cpu.load() is None:
        print(f"specd's top-k kernel is not available: {int4_avx2.unavailable_reason()}")
        return 1
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for rows in args.rows:
        xs = [torch.randn(rows, args.vocab, generator=g) * 4 for _ in range(_COPIES)]
        forms: dict[str, Callable[[torch.Tensor], object]] = {
            "torch topk + logsumexp": lambda x: top_k_cpu.torch_top_k_probs(x, args.k),
            "specd kernel": lambda x: top_k_cpu.top_k_probs(x, args.k),
        }
        ms = {name: best_ms(fn, xs, args.rounds) for name, fn in forms.items()}
        rows_out.append({"rows": rows, "ms": {k: round(v, 4) for k, v in ms.items()}})
        print(rows, "  ".join(f"{k}: {v:.3f} ms" for k, v in ms.items()), flush=True)
    result = {
        "command": "python -m loadtest.bench_top_k " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": loadavg()},
        "vocab": args.vocab,
        "k": args.k,
        "torch_threads": torch_threads,
        "kernel_threads": kernel_threads,
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "top-k.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        *report_header("Top-k next tokens with probabilities", result),
        f"Vocabulary {args.vocab}, k = {args.k}; torch on {torch_threads} thread(s), the kernel "
        f"on {kernel_threads}; ms per call, min of {args.rounds} rounds.",
        "",
        "| rows | torch topk + logsumexp | specd kernel | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        t, k = r["ms"]["torch topk + logsumexp"], r["ms"]["specd kernel"]
        lines.append(f"| {r['rows']} | {t:.3f} | {k:.3f} | {t / k:.1f}x |")
    lines.append("")
    (args.out / "top-k.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'top-k.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
