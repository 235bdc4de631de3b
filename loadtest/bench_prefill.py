"""What batch-invariant prefill costs: prompt attention in per-block pieces against one call.

    python -m loadtest.bench_prefill [--lengths 128 256 512 1024 2048] [--out DIR]

The torch attention backend attends a prompt's rows one KV block at a time, each piece over
the keys up to its end (server/model/attention.py, ``_prompt_segments``), so that a row's
result does not depend on how the scheduler cut the prompt into chunks. One causal SDPA call
over the whole prompt computes the same attention (to float rounding) in fewer, larger calls.
Two measurements, side by side in one run:

- attention alone, a forward's worth (every layer: write K/V, gather, attend) at the model's
  head shapes, pieces as served against one causal call, on the same paged cache;
- the whole prefill of one prompt of that length (the engine, int4 as served, max_tokens 1),
  to show what share of a prefill the pieces' extra cost is.

Writes ``<out>/prefill.md`` (and .json) with the command, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from loadtest.bench_engine import add_cpu_linear_plan_flag, machine_info, report_header
from loadtest.host import loadavg
from server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from server.engine.offline import OfflineEngine
from server.engine.sampling_params import SamplingParams
from server.model.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    build_attention_metadata,
    write_kv,
)
from server.model.cpu_threads import apply_cpu_threads
from server.model.loader import resolve_model

_BLOCK_SIZE = 16


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median ms of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class AttentionCase:
    """One prompt of ``length`` tokens in a paged cache, attended by every layer of a model
    with these head shapes: as served (pieces) or as one causal call."""

    def __init__(self, length: int, layers: int, q_heads: int, kv_heads: int, head_dim: int):
        gen = torch.Generator().manual_seed(length)
        blocks = (length + _BLOCK_SIZE - 1) // _BLOCK_SIZE
        self.layers = layers
        self.scale = head_dim**-0.5
        self.q = torch.randn(length, q_heads, head_dim, generator=gen)
        self.k = torch.randn(length, kv_heads, head_dim, generator=gen)
        self.v = torch.randn(length, kv_heads, head_dim, generator=gen)
        self.k_cache = torch.zeros(blocks, _BLOCK_SIZE, kv_heads, head_dim)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.block_ids = list(range(blocks))
        self.length = length

    def _meta(self) -> AttentionMetadata:
        return build_attention_metadata(
            [self.length], [0], [self.block_ids], _BLOCK_SIZE, torch.device("cpu"),
            prompt_lens=[self.length],
        )  # fmt: skip

    def pieces(self) -> torch.Tensor:
        backend = TorchAttentionBackend()
        meta = self._meta()
        backend.prepare(meta)
        for _ in range(self.layers):
            out = backend.forward(
                self.q, self.k, self.v, self.k_cache, self.v_cache, meta, self.scale
            )
        return out

    def one_call(self) -> torch.Tensor:
        meta = self._meta()
        blocks = torch.tensor(self.block_ids)
        for _ in range(self.layers):
            write_kv(self.k, self.v, self.k_cache, self.v_cache, meta.slot_mapping, None)
            kg = self.k_cache[blocks].flatten(0, 1)[: self.length].transpose(0, 1)[None]
            vg = self.v_cache[blocks].flatten(0, 1)[: self.length].transpose(0, 1)[None]
            qg = self.q.transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                qg, kg, vg, is_causal=True, scale=self.scale, enable_gqa=True
            )[0].transpose(0, 1)
        return out


def prompt_of(tokenizer: object, length: int) -> list[int]:
    """A prompt of exactly ``length`` tokens: chat text repeated and cut."""
    text = "Explain how a compiler turns source code into machine instructions, step by step. "
    ids = tokenizer.encode(text * (length // 8 + 1), add_special_tokens=False)  # type: ignore[attr-defined]
    return ids[:length]


def whole_prefill_ms(engine: OfflineEngine, length: int, repeats: int) -> float:
    prompt = prompt_of(engine.tokenizer, length)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    return median_ms(lambda: engine.generate([prompt], params), repeats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quantization", default="auto", help="as specd's flag")
    ap.add_argument("--cpu-threads", type=int, default=0, help="as specd's flag (0: cores - 1)")
    add_cpu_linear_plan_flag(ap)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/engine"))
    args = ap.parse_args(argv)
    load_start = loadavg()
    threads = apply_cpu_threads(args.cpu_threads)
    model_dir = resolve_model(args.model)
    engine = OfflineEngine(
        EngineConfig(
            model=ModelConfig(
                model=str(model_dir),
                quantization=args.quantization,
                cpu_linear_plan=args.cpu_linear_plan,
            ),
            # Off: every repeat computes its prompt. One step takes the whole prompt.
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=max(args.lengths)),
            separate_process=False,
        )
    )
    hf = engine.core.runner.hf_config
    shapes = {
        "layers": hf.num_hidden_layers,
        "q_heads": hf.num_attention_heads,
        "kv_heads": hf.num_key_value_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
    }
    rows = []
    for length in args.lengths:
        case = AttentionCase(length, **shapes)
        diff = (case.pieces() - case.one_call()).abs().max().item()
        pieces = median_ms(case.pieces, args.repeats)
        one = median_ms(case.one_call, args.repeats)
        prefill = whole_prefill_ms(engine, length, args.repeats)
        row = {
            "length": length,
            "attention_pieces_ms": round(pieces, 2),
            "attention_one_call_ms": round(one, 2),
            "max_abs_diff": diff,
            "prefill_ms": round(prefill, 1),
        }
        rows.append(row)
        print(
            f"{length} tokens: attention {pieces:.1f} ms in pieces, {one:.1f} ms in one call; "
            f"prefill {prefill:.0f} ms",
            flush=True,
        )
    result = {
        "command": "python -m loadtest.bench_prefill " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": loadavg()},
        "model": args.model,
        "quantization": args.quantization,
        "shapes": shapes,
        "torch_threads": threads,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prefill.md").write_text(render(result))
    print(f"wrote {args.out / 'prefill.md'}")
    return 0


def render(result: dict) -> str:
    s = result["shapes"]
    lines = [
        *report_header("Prefill: prompt attention in pieces against one call", result),
        f"Model {result['model']} (--quantization {result['quantization']}): {s['layers']} "
        f"layers, {s['q_heads']} query / {s['kv_heads']} KV heads of {s['head_dim']}. "
        f"Attention: a forward's worth (every layer writes K/V, gathers, attends), median of "
        f"{result['repeats']}; pieces = one per {_BLOCK_SIZE}-token KV block as served, one "
        "call = one causal SDPA over the prompt. Prefill: the engine, one prompt, max_tokens "
        "1, median. Extra = (pieces - one call) / prefill.",
        "",
        "| prompt tokens | attention, pieces ms | one call ms | pieces / one call "
        "| prefill ms | extra share of prefill | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        pieces, one = r["attention_pieces_ms"], r["attention_one_call_ms"]
        share = (pieces - one) / r["prefill_ms"]
        lines.append(
            f"| {r['length']} | {pieces:.1f} | {one:.1f} | {pieces / one:.2f}x "
            f"| {r['prefill_ms']:.0f} | {share:+.1%} | {r['max_abs_diff']:.1e} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
