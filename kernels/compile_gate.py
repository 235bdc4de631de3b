"""Compile every kernel for sm_80 and sm_90 without a GPU and report shared memory.

    python -m kernels.compile_gate [--cc 80 90] [--json]

The interpreter accepts code the GPU compiler rejects (break/return in loops, exp on fp16,
dots under 16); this gate runs the real front end + PTX/cubin back end for the configs the
launchers pick. It must run with TRITON_INTERPRET unset (a fresh process: triton decides
between interpreter and compiler when `@triton.jit` runs, i.e. at import of the kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# Shared memory per block, opt-in maximum: H100 227 KiB, A100 163 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _signature(fn: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every arg: constexpr, an explicit type, or i32 (strides, sizes)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


# --quick: each code path once (split + merge, tree mask at 64 rows, fp32 ieee + padded head
# dim): ~half the cold compile time of the full set (measured 2m25s wall cold for the full set
# on the shared 2-core box, 50 s CPU).
QUICK = {"decode-8b-split", "verify-8b-tree64", "tree-d80-fp32"}


def _attention_cases(quick: bool = False) -> list[tuple[str, Callable, dict, dict, dict]]:
    import torch

    from kernels import tree_attention as ta

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    # (name, dtype, group, head_dim, max_q_len, has_mask, splits)
    shapes = [
        ("decode-8b", "bf16", 4, 128, 1, False, 1),
        ("decode-8b-split", "bf16", 4, 128, 1, False, 8),
        ("verify-8b-tree64", "fp16", 4, 128, 64, True, 1),
        ("verify-g8-tree32", "bf16", 8, 128, 32, True, 4),
        ("prefill-g1-d64", "fp16", 1, 64, 512, False, 1),
        ("tree-d80-fp32", "fp32", 1, 80, 48, True, 1),
    ]
    cases = []
    for name, dt, group, d, max_q, has_mask, splits in shapes:
        if quick and name not in QUICK:
            continue
        cfg = ta.attention_config(
            group=group, head_dim=d, max_q_len=max_q, dtype=dtypes[dt], on_gpu=True
        )
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        const = dict(cfg, HAS_MASK=has_mask, NUM_SPLITS=splits)
        types = {
            "q_ptr": _PTR[dt],
            "k_cache_ptr": _PTR[dt],
            "v_cache_ptr": _PTR[dt],
            "out_ptr": _PTR[dt],
            "part_o_ptr": "*fp32",
            "part_lse_ptr": "*fp32",
            "cu_q_ptr": "*i32",
            "prefix_lens_ptr": "*i32",
            "block_tables_ptr": "*i32",
            "mask_ptr": "*i32",
            "scale": "fp32",
            # a 2^31+ element pool: its block stride no longer fits int32
            "stride_kb": "i64",
            "stride_vb": "i64",
        }
        cases.append((f"tree_attention[{name}]", ta._tree_attention_kernel, types, const, opts))
        if splits > 1:
            mconst = {
                "NUM_SPLITS": splits,
                "BLOCK_S": splits,
                "HEAD_DIM": d,
                "BLOCK_D": cfg["BLOCK_D"],
            }
            mtypes = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": _PTR[dt]}
            cases.append(
                (f"merge_splits[{name}]", ta._merge_splits_kernel, mtypes, mconst, {"num_warps": 4})
            )
    return cases


def _cache_cases() -> list[tuple[str, Callable, dict, dict, dict]]:
    from kernels import kv_cache as kc

    cases = []
    for dt in ("bf16", "fp16"):
        p = _PTR[dt]
        cases.append(
            (
                f"write_kv[{dt}-h8-d128]",
                kc._write_kv_kernel,
                {
                    "k_ptr": p,
                    "v_ptr": p,
                    "k_cache_ptr": p,
                    "v_cache_ptr": p,
                    "slot_ptr": "*i64",
                    "stride_kcb": "i64",
                    "stride_vcb": "i64",
                },
                {"BLOCK_H": 8, "BLOCK_D": 128},
                {"num_warps": 4},
            )
        )
    cases.append(
        (
            "compact_kv[bf16-h8-d128]",
            kc._compact_kv_kernel,
            {
                "cache_ptr": "*bf16",
                "src_ptr": "*i64",
                "dst_ptr": "*i64",
                "cu_ptr": "*i32",
                "stride_l": "i64",
                "stride_b": "i64",
            },
            {"BLOCK_H": 8, "BLOCK_D": 128},
            {"num_warps": 4},
        )
    )
    cases.append(
        (
            "copy_blocks[bf16]",
            kc._copy_blocks_kernel,
            {
                "cache_ptr": "*bf16",
                "src_ptr": "*i32",
                "dst_ptr": "*i32",
                "stride_l": "i64",
                "stride_b": "i64",
            },
            {"BLOCK": 4096},
            {"num_warps": 4},
        )
    )
    return cases


def _extra_cases() -> list[tuple[str, Callable, dict, dict, dict]]:
    try:
        from kernels import verify
    except ImportError:
        return []
    return verify.compile_cases()


def run(ccs: tuple[int, ...] = (80, 90), quick: bool = False) -> list[dict[str, Any]]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile gate needs TRITON_INTERPRET unset (run it in a fresh process)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    cases = _attention_cases(quick) + _cache_cases() + _extra_cases()
    for name, fn, types, const, opts in cases:
        sig = _signature(fn, types, const)
        for cc in ccs:
            t0 = time.perf_counter()
            k = triton.compile(
                ASTSource(fn, signature=sig, constexprs=const),
                target=GPUTarget("cuda", cc, 32),
                options=opts,
            )
            results.append(
                {
                    "kernel": name,
                    "cc": cc,
                    "shared_bytes": int(k.metadata.shared),
                    "limit_bytes": SMEM_LIMIT[cc],
                    "num_warps": int(k.metadata.num_warps),
                    "compile_s": round(time.perf_counter() - t0, 2),
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    ap.add_argument("--quick", action="store_true", help="one config per code path")
    args = ap.parse_args(argv)
    results = run(tuple(args.cc), quick=args.quick)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(
                f"{r['kernel']:40s} sm_{r['cc']}  shared {r['shared_bytes'] / 1024:6.1f} KiB "
                f"(limit {r['limit_bytes'] // 1024} KiB)  {r['compile_s']:.1f} s"
            )
    over = [r for r in results if r["shared_bytes"] >= r["limit_bytes"]]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
