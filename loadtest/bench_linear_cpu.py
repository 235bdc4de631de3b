"""Few-row linear layers on CPU: F.linear, specd's fixed routing, and the start-up plan.

    python -m loadtest.bench_linear_cpu [--rows 1 2 4 8 ...]
        [--out loadtest/results/engine/linear-cpu.md]

Times a forward's worth of SmolLM2-135M's linears - its four projection shapes (qkv 960x576,
o 576x576, gate_up 3072x576, down 576x1536) in each of 30 layers, every layer with weights of
its own, so that each weight is read from memory as in a real forward - at the row counts of
decode (1 row per request) and speculative verify steps (1 + drafts rows per request).
Three ways, measured in turn at each row count (best of 3 runs of 5 forwards):

- ``F.linear`` (torch's own);
- "fixed": server.model.cpu_linear's routing before a plan, weight @ x.T for 2..64 rows;
- "planned": after ``plan_weights`` timed this machine at start-up, as ``specd serve`` does;
  the plan's choice (rows computed, product) is shown beside it.
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
from server.model import cpu_linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20, 24, 32, 48, 64, 65, 256]

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forward_ms(fn: LinearFn, rows: int, layers: list[list[torch.Tensor]]) -> float:
    """ms for one forward's worth of linears (every layer's every shape) at ``rows`` rows."""
    xs = [torch.randn(rows, w.shape[1]) for w in layers[0]]

    def forward() -> None:
        for weights in layers:
            for x, w in zip(xs, weights, strict=True):
                fn(x, w)

    forward()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            forward()
        best = min(best, (time.perf_counter() - start) / 5)
    return best * 1e3


def plan_summary(rows: int) -> str:
    """The plan at ``rows`` per shape, in SHAPES order: rows computed and product (F: F.linear,
    T: weight @ x.T), e.g. '16F / 9F / 16T / 9F'."""
    if not 1 <= rows <= cpu_linear.FEW_ROWS:
        return "F.linear"
    parts = []
    for o, i in SHAPES:
        choices = cpu_linear.planned_choices(torch.empty(o, i))
        choice = choices[rows - 1] if choices else None
        parts.append("-" if choice is None else f"{choice.rows}{'T' if choice.transposed else 'F'}")
    return " / ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine/linear-cpu.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    layers = [[torch.randn(o, i) for o, i in SHAPES] for _ in range(LAYERS)]
    m = machine_info()
    load_at_start = format_loadavg(loadavg())
    cpu_linear.clear_plans()
    start = time.perf_counter()
    cpu_linear.plan_weights(w for layer in layers for w in layer)
    plan_seconds = time.perf_counter() - start
    plans = {shape: cpu_linear.planned_choices(torch.empty(shape)) or () for shape in SHAPES}
    saved = cpu_linear.saved_plans()

    def fixed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, w)

    lines = [
        f"# Few-row linear layers on CPU, {m['date']}",
        "",
        "Command: `python -m loadtest.bench_linear_cpu " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), commit {m['git_commit']}.",
        "SmolLM2-135M's projection shapes x 30 layers of distinct weights; ms per forward's "
        "worth of linears (best of 3 runs of 5).",
        "",
        f"Load average at start: {load_at_start}. Start-up plan took {plan_seconds:.1f} s; "
        "it pads "
        + "; ".join(f"{o}x{i}: {cpu_linear.describe_padding(plans[(o, i)])}" for o, i in SHAPES)
        + ".",
        "",
        "| rows | F.linear ms | fixed ms | planned ms | planned / fixed | planned / F.linear "
        "| plan: rows computed, product (qkv / o / gate_up / down) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rows in args.rows:
        ref = forward_ms(F.linear, rows, layers)
        cpu_linear.clear_plans()
        unplanned = forward_ms(fixed, rows, layers)
        cpu_linear.restore_plans(saved)
        planned = forward_ms(fixed, rows, layers)
        lines.append(
            f"| {rows} | {ref:.1f} | {unplanned:.1f} | {planned:.1f} | "
            f"{planned / unplanned:.2f}x | {planned / ref:.2f}x | {plan_summary(rows)} |"
        )
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
