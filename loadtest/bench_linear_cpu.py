"""Few-row linear layers on CPU: F.linear against server.model.layers.linear.

    python -m loadtest.bench_linear_cpu [--rows 1 2 4 8 ...] [--pad-to 8]
        [--out loadtest/results/engine/linear-cpu.md]

Times SmolLM2-135M's four projection shapes (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536), scaled to its 30 layers, for 1 to 64 rows: the row counts of decode (1 row
per request) and speculative verify steps (1 + drafts rows per request). Best of 3 runs of 60.
``--pad-to N`` adds a column: specd's linear with the rows padded by zero rows up to the next
multiple of N (a verify step of 9-15 rows computed as 16), to see where padding pays.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from loadtest.bench_engine import machine_info
from loadtest.host import format_loadavg, loadavg
from server.model.layers import linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30
ROWS = [1, 2, 3, 4, 5, 8, 16, 64, 65, 256, 1024]

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_ms(fn: LinearFn, rows: int, weights: list[torch.Tensor]) -> float:
    xs = [torch.randn(rows, w.shape[1]) for w in weights]
    for _ in range(3):
        for x, w in zip(xs, weights, strict=True):
            fn(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(60):
            for x, w in zip(xs, weights, strict=True):
                fn(x, w)
        best = min(best, (time.perf_counter() - start) / 60)
    return best * 1e3 * LAYERS


def padded(multiple: int) -> LinearFn:
    """specd's linear on x padded with zero rows to the next multiple of ``multiple``."""

    def fn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        target = -(-rows // multiple) * multiple
        if target == rows:
            return linear(x, weight)
        return linear(torch.cat([x, x.new_zeros(target - rows, x.shape[1])]), weight)[:rows]

    return fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--pad-to", type=int, help="add a column padded to this row multiple")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine/linear-cpu.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    m = machine_info()
    lines = [
        f"# Few-row linear layers on CPU, {m['date']}",
        "",
        "Command: `python -m loadtest.bench_linear_cpu " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), commit {m['git_commit']}.",
        "SmolLM2-135M projection shapes x 30 layers; ms per forward's worth of linears.",
        "",
        f"Load average at start: {format_loadavg(loadavg())}.",
        "",
        "| rows | F.linear ms | specd linear ms | speed-up |"
        + (f" padded to x{args.pad_to} ms | padded / specd |" if args.pad_to else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if args.pad_to else ""),
    ]
    for rows in args.rows:
        ref = time_ms(F.linear, rows, weights)
        ours = time_ms(linear, rows, weights)
        line = f"| {rows} | {ref:.1f} | {ours:.1f} | {ref / ours:.2f}x |"
        if args.pad_to:
            pad = time_ms(padded(args.pad_to), rows, weights)
            line += f" {pad:.1f} | {pad / ours:.2f}x |"
        lines.append(line)
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
