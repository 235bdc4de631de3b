"""The embedded model's LM head in each form it could be served in, at 1..64 rows.

    python -m loadtest.bench_lm_head [--rows 1 2 4 8 16 32 64] [--out loadtest/results/engine]

The head of SmolLM2-135M is its tied 49152 x 576 embedding, stored in the GGUF as Q8_0. Forms,
timed side by side in one run on the real weights (ms per call, min over rounds, rotating
over three copies so the weights come from memory as in a forward):

- fp32 dense, as ``--quantization none`` computes it (server/model/cpu_linear.linear);
- bf16 dense (F.linear on bf16 weights and inputs);
- int4, two planes: the Q8_0 blocks exact (int4.split_q8), the kernel alone;
- the served head: those planes plus the exact rescoring of the candidates for the largest
  logit (server/model/int4_head.py), with the candidates per row it recomputed;
- int4, one plane rounded to nearest (what QUANTIZE_HEAD_RTN would serve: not exact).

Writes ``<out>/lm-head.md`` (and .json) with the command, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from loadtest.bench_engine import machine_info, report_header
from loadtest.host import loadavg
from server.model.cpu_linear import linear
from server.model.cpu_threads import apply_cpu_threads
from server.model.int4 import Int4Linear, quantize_rtn
from server.model.int4_head import RescoredInt4Head
from server.model.loader import resolve_model
from server.model.quantize import int4_dir, read_int4_tensors

_COPIES = 3


def best_ms(
    fn: Callable[[torch.Tensor, int], object], x: torch.Tensor, rounds: int, calls: int
) -> float:
    """ms per call of fn(x, copy), min over rounds, rotating over the copies."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            fn(x, i % _COPIES)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--cpu-threads", type=int, default=0, help="as specd's flag (0: cores - 1)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)
    load_start = loadavg()
    threads = apply_cpu_threads(args.cpu_threads)  # as the engine runs (cpu_threads.py)
    dense_dir = resolve_model(args.model)
    quant, _ = read_int4_tensors(int4_dir(dense_dir))
    planes = quant["lm_head"]
    table = planes.dequantize()  # equal to the dense conversion's embedding (tested)
    print(f"head {tuple(table.shape)}, {planes.planes} planes; building copies", flush=True)
    fp32 = [table.clone() for _ in range(_COPIES)]
    bf16 = [table.to(torch.bfloat16) for _ in range(_COPIES)]
    kernels = [Int4Linear(planes) for _ in range(_COPIES)]
    served = [RescoredInt4Head(planes) for _ in range(_COPIES)]
    rtn = [Int4Linear(quantize_rtn(table)) for _ in range(_COPIES)]
    torch.manual_seed(0)
    rows_out = []
    for rows in args.rows:
        # Hidden states at the final norm have unit RMS times its weight: randn is that scale.
        x = torch.randn(rows, table.shape[1])
        served[0].rows_seen = served[0].logits_rescored = 0
        forms: dict[str, Callable[[torch.Tensor, int], object]] = {
            "fp32 dense": lambda x, i: linear(x, fp32[i]),
            "bf16 dense": lambda x, i: F.linear(x.bfloat16(), bf16[i]),
            "int4 2 planes (kernel)": lambda x, i: kernels[i](x),
            "served (planes + rescoring)": lambda x, i: served[i](x),
            "int4 1 plane RTN": lambda x, i: rtn[i](x),
        }
        cells = {name: best_ms(fn, x, args.rounds, args.calls) for name, fn in forms.items()}
        rescored = served[0].logits_rescored / max(served[0].rows_seen, 1)
        row = {"rows": rows, "ms": {k: round(v, 3) for k, v in cells.items()}}
        row["rescored_per_row"] = round(rescored, 1)
        rows_out.append(row)
        print(rows, "  ".join(f"{k}: {v:.2f} ms" for k, v in cells.items()), flush=True)
    result = {
        "command": "python -m loadtest.bench_lm_head " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": loadavg()},
        "head_shape": list(table.shape),
        "torch_threads": threads,
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm-head.json").write_text(json.dumps(result, indent=2) + "\n")
    forms = list(rows_out[0]["ms"])
    lines = [
        *report_header("LM head forms", result),
        f"Head {table.shape[0]} x {table.shape[1]} (the embedded SmolLM2's tied Q8_0 "
        "embedding); ms per call, min of rounds; ratio = fp32 dense / served.",
        "",
        "| rows | " + " | ".join(forms) + " | served speed-up | rescored logits / row |",
        "|---:|" + "---:|" * (len(forms) + 2),
    ]
    for r in rows_out:
        ms = r["ms"]
        ratio = ms["fp32 dense"] / ms["served (planes + rescoring)"]
        lines.append(
            f"| {r['rows']} | "
            + " | ".join(f"{ms[f]:.2f}" for f in forms)
            + f" | {ratio:.2f}x | {r['rescored_per_row']} |"
        )
    lines.append("")
    (args.out / "lm-head.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'lm-head.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
