"""The two CPU int4 kernels side by side on the embedded model's own weights.

    python -m loadtest.bench_int4_kernels [--rows 1 2 3 4 5 8 9 16 32 64 256]
        [--out loadtest/results/engine]

A forward's worth of the embedded SmolLM2-135M's int4 matrices (every decoder linear as the
int4 entry stores them: q, k, v, o, gate, up, down in each of 30 layers, which the engine fuses
into four; the LM head's two Q8_0 planes on its own) computed with torch's bf16 kernel
(``aten::_weight_int4pack_mm_for_cpu``) and with specd's float32 AVX2 kernel
(kernels/cpu/int4_linear.cpp), at each row count: 1 is a decode step, k + 1 verifies k drafts,
hundreds are a prefill chunk. ms per forward's worth, median of rounds in which the kernels
take turns, in one process on the engine's thread count; the decoder's matrices are called in
layer order, so weights come from memory as they do in a step. Writes ``<out>/int4-kernels.md``
(and .json, .png) with the command, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from loadtest.bench_engine import machine_info, report_header
from loadtest.host import loadavg
from server.model import int4_avx2
from server.model.cpu_threads import apply_cpu_threads
from server.model.int4 import Int4Linear, Kernel, kernel_seconds
from server.model.loader import resolve_model
from server.model.quantize import int4_dir, read_int4_tensors

KERNELS: tuple[Kernel, ...] = ("aten", "avx2")
LABELS = {"aten": "torch bf16 kernel", "avx2": "specd AVX2 fp32 kernel"}


def forward_ms(layers: dict[Kernel, list[Int4Linear]], rows: int, rounds: int) -> dict:
    """Median ms per kernel to run all its layers once on ``rows`` rows (int4.kernel_seconds:
    the kernels take turns round by round)."""
    return {k: round(t * 1e3, 3) for k, t in kernel_seconds(layers, rows, rounds).items()}


def plot(rows_out: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r["rows"] for r in rows_out]
    for kernel in KERNELS:
        ms = [r["decoder_ms"][kernel] + r["head_ms"][kernel] for r in rows_out]
        ax.plot(rows, ms, marker="o", label=LABELS[kernel])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (1 = decode, k + 1 = verify k drafts)")
    ax.set_ylabel("ms per forward's worth of int4 linears")
    ax.set_title("SmolLM2-135M int4 linears, decoder + head")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8, 9, 16, 32, 64, 256])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cpu-threads", type=int, default=0, help="as specd's flag (0: cores - 1)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)
    if int4_avx2.load() is None:
        ap.error(f"the AVX2 kernel is not available here: {int4_avx2.unavailable_reason()}")
    load_start = loadavg()
    threads = apply_cpu_threads(args.cpu_threads)  # as the engine runs (cpu_threads.py)
    quant, _ = read_int4_tensors(int4_dir(resolve_model(args.model)))
    names = sorted((n for n in quant if n != "lm_head"), key=_layer_order)
    print(f"{len(names)} decoder matrices + the head; packing for both kernels", flush=True)
    decoder = {k: [Int4Linear(quant[n], kernel=k) for n in names] for k in KERNELS}
    head = {k: [Int4Linear(quant["lm_head"], kernel=k)] for k in KERNELS}
    torch.manual_seed(0)
    rows_out = []
    for rows in args.rows:
        row = {
            "rows": rows,
            "decoder_ms": forward_ms(decoder, rows, args.rounds),
            "head_ms": forward_ms(head, rows, args.rounds),
        }
        rows_out.append(row)
        print(rows, row["decoder_ms"], row["head_ms"], flush=True)
    result = {
        "command": "python -m loadtest.bench_int4_kernels " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": loadavg()},
        "torch_threads": threads,
        "decoder_matrices": len(names),
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4-kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows_out, args.out / "int4-kernels.png")
    (args.out / "int4-kernels.md").write_text(report(result))
    print(f"wrote {args.out / 'int4-kernels.md'}")
    return 0


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    index = next((int(p) for p in parts if p.isdigit()), -1)
    order = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return index, str(order.index(parts[-1]) if parts[-1] in order else parts[-1])


def report(result: dict) -> str:
    lines = [
        *report_header("CPU int4 kernels", result),
        f"The embedded SmolLM2-135M's int4 weights: {result['decoder_matrices']} decoder "
        "matrices as the int4 entry stores them (q, k, v, o, gate, up, down x 30 layers; the "
        "engine fuses q/k/v and gate/up) called in layer order, and the "
        "49152 x 576 head as two exact Q8_0 planes. ms per forward's worth, median of rounds "
        "(the kernels take turns); "
        "speed-up = torch / specd.",
        "",
        "| rows | decoder, torch bf16 ms | decoder, specd AVX2 ms | speed-up | head, torch ms "
        "| head, specd ms | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        d, h = r["decoder_ms"], r["head_ms"]
        lines.append(
            f"| {r['rows']} | {d['aten']:.2f} | {d['avx2']:.2f} | {d['aten'] / d['avx2']:.2f}x "
            f"| {h['aten']:.2f} | {h['avx2']:.2f} | {h['aten'] / h['avx2']:.2f}x |"
        )
    lines += ["", "![ms against rows](int4-kernels.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
