"""Offline engine throughput on the embedded model, weight formats side by side.

    python -m loadtest.bench_engine [--model smollm2-135m-instruct]
        [--quantization none int4 | none int4:aten int4:avx2 | none int4@torch int4@cpu
                        | none/1 int4/1 none int4]
        [--batch-sizes 1 8 32] [--new-tokens 128] [--verify-rows 16] [--verify-context 256]
        [--no-transformers] [--out loadtest/results/engine]

Everything is measured in one run on one machine, in one process: an engine per weight format
(``--quantization``, ModelConfig.quantization; ``int4:aten`` / ``int4:avx2`` pin the CPU int4
kernel, server/model/int4.py; an ``@torch`` / ``@cpu`` suffix pins the attention backend, a
``/N`` suffix the threads of specd's CPU kernels, --kernel-threads;
plain ``int4`` takes the engine's own choices) is built first,
then the formats take turns at each measurement (each batch size, each single-stream round;
the order rotated per turn). Per format: the engine's output tokens/s at each
batch size (all prompts submitted at once, ignore_eos, greedy), single-stream decode tokens/s
(prefill excluded), and the verify-row cost curve: one engine step (ModelRunner.execute) of one
greedy request at a fixed context with 1..N query rows (1 = plain decode, k + 1 = verifying k
draft tokens as a chain), built and timed by kernels/gpu_check/engine_stages.py's ``step_plan``
/ ``time_step`` on the engine's own runner. For ``none`` the single stream is also compared
with transformers' ``generate`` on the same weights (fp32). Then every format against the first
one given (``none`` by default): tokens/s side by side, the single-stream ratio against issue
11's target (int4 >= 2.5x fp32), and step ms per row count, with a PNG of the curves. Writes a
JSON file, a markdown report and the PNG named by date, with the command, the machine, the
versions and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from loadtest import report
from loadtest.host import format_loadavg, loadavg
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model import int4_avx2
from server.model.cpu_threads import resolve_kernel_threads
from server.model.int4 import Int4Linear
from server.model.loader import resolve_model

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
    "List ten fruits and describe the taste of each in one sentence.",
    "What are the main causes of the French Revolution?",
    "Translate 'good morning, how are you today?' into French, Spanish and German.",
    "Give me a recipe for pancakes with step by step instructions.",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "Why is the sky blue? Answer for a ten year old.",
]
# Issue 11: single-stream decode with int4 weights at least this many times fp32's.
INT4_SINGLE_STREAM_TARGET = 2.5
_DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def machine_info() -> dict[str, str]:
    """The host as the sweep reports describe it (loadtest.report), plus what offline
    benchmarks add: torch's version and threads, and the time of the run."""
    host = report.machine_info()
    git = report.git_info()
    return {
        "cpu": f"{host['cpu_model']} ({host['cpu_simd']})",
        "cores": str(host["usable_cores"]),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "kernel_threads": str(resolve_kernel_threads(0)) + " (auto; a /N format pins its own)",
        "python": str(host["python"]),
        "git_commit": git["commit"][:7] + (" (dirty)" if git["dirty"] == "yes" else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def report_header(title: str, result: dict) -> list[str]:
    """The first lines of an offline benchmark's markdown: title and date, the command, and
    the machine with the engine's thread count, the commit and the load averages. ``result``
    holds "machine" (``machine_info``), "command", "torch_threads" and "load_average"."""
    m = result["machine"]
    return [
        f"# {title}, {m['date']}",
        "",
        f"Command: `{result['command'].strip()}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({result['torch_threads']} threads, as the engine runs), commit {m['git_commit']}. "
        f"Load average at start: {format_loadavg(result['load_average']['start'])}; "
        f"at end: {format_loadavg(result['load_average']['end'])}.",
        "",
    ]


def chat_prompts(tokenizer: object, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    return out


def engine_throughput(engine: OfflineEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    return {
        "batch": len(prompts),
        "seconds": round(elapsed, 3),
        "output_tokens": generated,
        "output_tokens_per_s": round(generated / elapsed, 2),
    }


def single_stream_once(engine: OfflineEngine, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one request (prefill excluded: the time of a 1-token request, the
    prefill and first token, is taken off the time of the whole request)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate([prompt], replace(params, max_tokens=1))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    engine.generate([prompt], params)
    total = time.perf_counter() - start
    return (new_tokens - 1) / max(total - prefill, 1e-9)


def verify_row_curve(runner: Any, max_rows: int, context: int, repeats: int) -> list[dict]:
    """Median seconds of one step of one greedy request at `context` cached tokens with
    1..max_rows query rows (rows - 1 draft tokens verified as a chain), timed on the engine's
    runner between its requests: the step writes K/V into blocks 0, 1, ..., which no request
    holds then (and prefix caching is off, so nothing reads them back)."""
    from kernels.gpu_check.engine_stages import step_plan, time_step

    device = str(runner.device.type)
    out = []
    for rows in range(1, max_rows + 1):
        step = step_plan(runner, 1, context, rows - 1, False, seed=rows)
        seconds = time_step(runner, step, repeats, device)
        out.append(
            {
                "rows": rows,
                "step_ms": round(seconds * 1e3, 3),
                "ms_per_row": round(seconds * 1e3 / rows, 3),
            }
        )
    return out


def transformers_single_stream(
    model_dir: Path, prompt: list[int], new_tokens: int, repeats: int
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            total = time.perf_counter() - start
            produced = out.shape[1] - ids.shape[1]
            rates.append((produced - 1) / max(total - prefill, 1e-9))
    return statistics.median(rates)


def engine_config(
    args: argparse.Namespace,
    model_dir: Path,
    quantization: str,
    int4_kernel: str = "auto",
    attention_backend: str = "auto",
    kernel_threads: int = 0,
) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=str(model_dir),
            dtype=args.dtype,
            quantization=quantization,  # type: ignore[arg-type]
            int4_kernel=int4_kernel,  # type: ignore[arg-type]
            cpu_linear_plan=args.cpu_linear_plan,
            kernel_threads=kernel_threads,
        ),
        # Off: every measurement computes its prompts (no reuse across repeats).
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=args.max_num_batched_tokens
        ),
        attention_backend=attention_backend,  # type: ignore[arg-type]
        separate_process=False,
    )


def split_format(spec: str) -> tuple[str, str | None]:
    """``int4:avx2`` -> (``int4``, ``avx2``): a --quantization value and the CPU int4 kernel
    it is measured with (--int4-kernel; None: the engine's own choice). An ``@backend``
    suffix (``split_backend``) is not part of it."""
    quantization, _, kernel = spec.partition("/")[0].partition("@")[0].partition(":")
    return quantization, kernel or None


def split_backend(spec: str) -> str | None:
    """``int4@torch`` -> ``torch``: the attention backend a format is measured with
    (--attention-backend; None: the engine's own choice)."""
    return spec.partition("/")[0].partition("@")[2] or None


def split_threads(spec: str) -> int | None:
    """``int4/1`` -> 1: the threads of specd's CPU kernels a format is measured with
    (--kernel-threads; None: the engine's own choice). The count is process-wide, so it is
    set before each of the format's measurements."""
    threads = spec.partition("/")[2]
    return int(threads) if threads else None


@dataclass
class _Built:
    """One weight format's engine, built before any measurement."""

    spec: str
    engine: OfflineEngine
    label: str
    kernels: list[str]
    build_s: float
    kernel_threads: int

    def activate(self) -> None:
        """Sets the process-wide settings this format is measured with."""
        int4_avx2.set_kernel_threads(self.kernel_threads)


def build_format(args: argparse.Namespace, model_dir: Path, spec: str) -> _Built:
    quantization, kernel = split_format(spec)
    backend = split_backend(spec)
    threads = resolve_kernel_threads(split_threads(spec) or 0)
    int4_avx2.set_kernel_threads(threads)
    t0 = time.perf_counter()
    engine = OfflineEngine(
        engine_config(args, model_dir, quantization, kernel or "auto", backend or "auto", threads)
    )
    build_s = time.perf_counter() - t0
    runner = engine.core.runner
    kernels = sorted({m.kernel for m in runner.model.modules() if isinstance(m, Int4Linear)})
    label = "int4" if kernels else _DTYPE_LABELS.get(runner.dtype, str(runner.dtype))
    if kernel is not None:  # pinned: formats that differ only in the kernel need two names
        label += f" ({kernel} kernel)"
    if quantization == "auto":
        label += " (auto)"
    if backend is not None:  # pinned too
        label += f" [{runner.model.backend.name} attention]"
    if split_threads(spec) is not None:
        label += f" ({threads} kernel thread{'s' if threads > 1 else ''})"
    print(f"[{spec}] engine built in {build_s:.1f} s ({label})", flush=True)
    return _Built(spec, engine, label, kernels, round(build_s, 1), threads)


def _rotated(built: list[_Built], turn: int) -> list[_Built]:
    """The formats in the order of one turn, rotated one place per turn, so that each is
    measured first, second, ... equally often."""
    shift = turn % len(built)
    return built[shift:] + built[:shift]


def bench_formats(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    """Every measurement of every weight format. The formats take turns at each measurement
    (a batch size, a single-stream round), so a slow moment of a shared machine falls on all
    of them rather than on whichever was being measured: this host's speed moves by a quarter
    within the hour, which one format after the other turned into ratios a quarter off."""
    built = [build_format(args, model_dir, spec) for spec in args.quantization]
    tokenizer = built[0].engine.tokenizer
    throughput: dict[str, list[dict]] = {b.spec: [] for b in built}
    for turn, batch in enumerate(args.batch_sizes):
        prompts = chat_prompts(tokenizer, batch)
        for b in _rotated(built, turn):
            b.activate()
            row = engine_throughput(b.engine, prompts, args.new_tokens)
            rate = row["output_tokens_per_s"]
            print(f"[{b.spec}] batch {batch}: {rate} output tok/s", flush=True)
            throughput[b.spec].append(row)
    prompt = chat_prompts(tokenizer, 1)[0]
    rounds: dict[str, list[float]] = {b.spec: [] for b in built}
    for turn in range(args.repeats):
        for b in _rotated(built, turn):
            b.activate()
            rounds[b.spec].append(single_stream_once(b.engine, prompt, args.new_tokens))
    out = []
    for b in built:
        rates = rounds[b.spec]
        print(f"[{b.spec}] single stream: {statistics.median(rates):.1f} tok/s", flush=True)
        runner = b.engine.core.runner
        b.activate()
        curve = verify_row_curve(runner, args.verify_rows, args.verify_context, args.verify_repeats)
        print(
            f"[{b.spec}] verify rows: "
            + ", ".join(f"{r['rows']}: {r['step_ms']:.1f} ms" for r in curve),
            flush=True,
        )
        out.append(
            {
                "quantization": b.spec,
                "label": b.label,
                "int4_kernels": b.kernels,
                "kernel_threads": b.kernel_threads,
                "build_s": b.build_s,
                "throughput": throughput[b.spec],
                "single_stream": {
                    "repeats": args.repeats,
                    "tokens_per_s": statistics.median(rates),
                    "rounds": [round(r, 2) for r in rates],
                },
                "verify_rows": curve,
                "prompt": prompt,
            }
        )
    return out


def compare(formats: list[dict]) -> dict:
    """Each format after the first against the first (the baseline): tokens/s per batch,
    single stream, and step ms per row count; ratios are other / baseline."""
    base = formats[0]
    out: dict[str, Any] = {"baseline": base["quantization"], "against": {}}
    for f in formats[1:]:
        by_batch = {r["batch"]: r for r in f["throughput"]}
        by_rows = {r["rows"]: r for r in f["verify_rows"]}
        single = f["single_stream"]["tokens_per_s"] / base["single_stream"]["tokens_per_s"]
        entry: dict[str, Any] = {
            "throughput_ratio": {
                r["batch"]: round(
                    by_batch[r["batch"]]["output_tokens_per_s"] / r["output_tokens_per_s"], 3
                )
                for r in base["throughput"]
            },
            "single_stream_ratio": round(single, 3),
            # Per round: the formats ran minutes apart at most, so each ratio is paired.
            "single_stream_round_ratios": [
                round(o / b, 3)
                for o, b in zip(
                    f["single_stream"]["rounds"], base["single_stream"]["rounds"], strict=True
                )
            ],
            "step_ms_ratio": {
                r["rows"]: round(by_rows[r["rows"]]["step_ms"] / r["step_ms"], 3)
                for r in base["verify_rows"]
            },
        }
        base_format = split_format(base["quantization"])[0]
        if split_format(f["quantization"])[0] == "int4" and base_format == "none":
            entry["single_stream_target"] = INT4_SINGLE_STREAM_TARGET
            entry["single_stream_target_met"] = single >= INT4_SINGLE_STREAM_TARGET
        out["against"][f["quantization"]] = entry
    return out


def plot_verify_rows(formats: list[dict], path: Path, context: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in formats:
        rows = [r["rows"] for r in f["verify_rows"]]
        ax.plot(rows, [r["step_ms"] for r in f["verify_rows"]], marker="o", label=f["label"])
    ax.set_xlabel("query rows in the step (1 = decode, k + 1 = verify k drafts)")
    ax.set_ylabel("step ms (median)")
    ax.set_title(f"One engine step, one request at {context} cached tokens")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _format_section(f: dict, result: dict) -> list[str]:
    s = f["single_stream"]
    lines = [
        f"## {f['label']} (--quantization {f['quantization']})",
        "",
        f"Engine built in {f['build_s']} s"
        + (f"; int4 kernel: {'/'.join(f['int4_kernels'])}." if f.get("int4_kernels") else "."),
        "",
        "| batch | output tokens | seconds | output tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    for row in f["throughput"]:
        lines.append(
            f"| {row['batch']} | {row['output_tokens']} | {row['seconds']} | "
            f"{row['output_tokens_per_s']} |"
        )
    text = (
        f"Single-stream decode (median of {s['repeats']} rounds, prefill excluded): specd "
        f"{s['tokens_per_s']:.1f} tok/s (rounds: "
        + ", ".join(f"{r:.1f}" for r in s["rounds"])
        + ")"
    )
    hf = result.get("transformers")
    if hf is not None and f["quantization"] == hf["quantization"]:
        text += (
            f", transformers generate ({hf['dtype']}) {hf['tokens_per_s']:.1f} tok/s, "
            f"ratio **{s['tokens_per_s'] / hf['tokens_per_s']:.2f}x**"
        )
    return [*lines, "", text + ".", ""]


def _comparison_section(result: dict, png: Path) -> list[str]:
    formats = result["formats"]
    base, others = formats[0], formats[1:]
    against = result["comparison"]["against"]
    names = " / ".join(f["label"] for f in others)
    lines = [
        f"## {names} against {base['label']}",
        "",
        f"Ratios are other / {base['label']}: above 1 means more tokens/s (the throughput "
        "tables, the single stream) or a slower step (the verify-row table).",
        "",
    ]
    head = ["batch", f"{base['label']} tok/s"]
    for f in others:
        head += [f"{f['label']} tok/s", f"{f['label']} / {base['label']}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in base["throughput"]:
        cells = [str(row["batch"]), str(row["output_tokens_per_s"])]
        for f in others:
            other = next(r for r in f["throughput"] if r["batch"] == row["batch"])
            ratio = against[f["quantization"]]["throughput_ratio"][row["batch"]]
            cells += [str(other["output_tokens_per_s"]), f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    b = base["single_stream"]["tokens_per_s"]
    for f in others:
        c = against[f["quantization"]]
        text = (
            f"Single-stream decode: {f['label']} {f['single_stream']['tokens_per_s']:.1f} tok/s "
            f"against {base['label']} {b:.1f} tok/s, **{c['single_stream_ratio']:.2f}x** "
            "(round by round: "
            + ", ".join(f"{r:.2f}x" for r in c["single_stream_round_ratios"])
            + ")"
        )
        if "single_stream_target" in c:
            met = "met" if c["single_stream_target_met"] else "not met"
            text += f" (target >= {c['single_stream_target']}x: {met})"
        lines += [text + ".", ""]
    lines += [
        "### Verify-row cost",
        "",
        f"One engine step (ModelRunner.execute) of one greedy request at "
        f"{result['verify']['context']} cached tokens: 1 row is a plain decode, k + 1 rows "
        f"verify k draft tokens as a chain; median of {result['verify']['repeats']} after a "
        "warm-up.",
        "",
    ]
    head = ["rows"]
    for f in formats:
        head += [f"{f['label']} ms", f"{f['label']} ms/row"]
    head += [f"{f['label']} / {base['label']}" for f in others]
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, row in enumerate(base["verify_rows"]):
        cells = [str(row["rows"])]
        for f in formats:
            r = f["verify_rows"][i]
            cells += [f"{r['step_ms']:.2f}", f"{r['ms_per_row']:.2f}"]
        cells += [
            f"{against[f['quantization']]['step_ms_ratio'][row['rows']]:.2f}x" for f in others
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"![step ms against rows]({png.name})", ""]


def write_report(out_dir: Path, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    png = plot_verify_rows(
        result["formats"], out_dir / f"{stamp}-verify-rows.png", result["verify"]["context"]
    )
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    la = result["load_average"]
    lines = [
        f"# Engine throughput, {m['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, commit {m['git_commit']}.",
        f"Load average (1, 5, 15 min) at start: {format_loadavg(la['start'])}; "
        f"at end: {format_loadavg(la['end'])}.",
        f"Model: {result['model']}, weight formats "
        + ", ".join(f"{f['label']} (--quantization {f['quantization']})" for f in result["formats"])
        + f", taking turns; {result['new_tokens']} new tokens per request, greedy, "
        "ignore_eos, all requests submitted at once.",
        "",
    ]
    for f in result["formats"]:
        lines += _format_section(f, result)
    if len(result["formats"]) > 1:
        lines += _comparison_section(result, png)
    else:
        lines += [f"![step ms against rows]({png.name})", ""]
    path = out_dir / f"{stamp}.md"
    path.write_text("\n".join(lines))
    return path


def _format_spec(value: str) -> str:
    quantization, kernel = split_format(value)
    if quantization not in ("none", "int4", "auto") or kernel not in (None, "aten", "avx2"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected none, int4, auto, int4:aten or int4:avx2"
        )
    if split_backend(value) not in (None, "torch", "cpu"):
        raise argparse.ArgumentTypeError(f"{value!r}: an @attention backend is torch or cpu")
    threads = value.partition("/")[2]
    if threads and not (threads.isdigit() and int(threads) >= 1):
        raise argparse.ArgumentTypeError(f"{value!r}: /N kernel threads must be >= 1")
    if kernel is not None and quantization != "int4":
        raise argparse.ArgumentTypeError(f"{value!r}: a kernel goes with int4 only")
    return value


def add_cpu_linear_plan_flag(ap: argparse.ArgumentParser) -> None:
    """``--no-cpu-linear-plan``: the benchmarks' switch for ModelConfig.cpu_linear_plan."""
    ap.add_argument(
        "--no-cpu-linear-plan",
        dest="cpu_linear_plan",
        action="store_false",
        help="ModelConfig.cpu_linear_plan off (no start-up timing of the linear shapes)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--quantization",
        nargs="+",
        type=_format_spec,
        default=["none", "int4"],
        help="weight formats, measured in this order; the first is the baseline of the ratios. "
        "int4:aten / int4:avx2 pin the CPU int4 kernel (--int4-kernel); a suffix @torch / @cpu "
        "pins the attention backend (--attention-backend), e.g. int4@torch int4@cpu",
    )
    ap.add_argument("--dtype", default="auto", help="ModelConfig.dtype (auto: fp32 on CPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--verify-rows", type=int, default=16, help="the curve's rows: 1..N")
    ap.add_argument("--verify-context", type=int, default=256, help="cached tokens in the curve")
    ap.add_argument("--verify-repeats", type=int, default=7, help="timed steps per row count")
    ap.add_argument(
        "--no-transformers",
        dest="transformers",
        action="store_false",
        help="skip the single-stream comparison with transformers' generate (none only)",
    )
    add_cpu_linear_plan_flag(ap)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)
    if len(set(args.quantization)) != len(args.quantization):
        ap.error("--quantization: each format once")

    load_start = loadavg()
    model_dir = resolve_model(args.model)
    formats = bench_formats(args, model_dir)
    gc.collect()  # the engines are gone before transformers' model is built
    hf = None
    if args.transformers and "none" in args.quantization:
        none = next(f for f in formats if f["quantization"] == "none")
        rate = transformers_single_stream(model_dir, none["prompt"], args.new_tokens, args.repeats)
        gc.collect()
        hf = {"quantization": "none", "dtype": "fp32", "tokens_per_s": rate}
        ours = none["single_stream"]["tokens_per_s"]
        print(f"single stream: specd {ours:.1f} tok/s, transformers {rate:.1f} tok/s", flush=True)
    for f in formats:
        del f["prompt"]
    result = {
        "command": "python -m loadtest.bench_engine " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": loadavg()},
        "model": args.model,
        "new_tokens": args.new_tokens,
        "verify": {
            "context": args.verify_context,
            "rows": args.verify_rows,
            "repeats": args.verify_repeats,
        },
        "formats": formats,
        "transformers": hf,
        "comparison": compare(formats),
    }
    print(f"wrote {write_report(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
