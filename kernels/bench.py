"""Tree-attention benchmark on a GPU: `python -m kernels.bench [--quick] [--out-dir DIR]`.

Shapes of an 8B-class model (32 query heads, 8 KV heads, head dim 128, bf16, block size 16):
batch 1-64, prefix 512-8k, tree 1-64 nodes (1 = plain decode). For each point:

- `kernel_us`: tree_attention, triton.testing.do_bench median.
- `floor_us`: bytes the kernel must move (K and V of prefix + tree, q, out) / HBM bandwidth
  (H100 SXM: 3.35 TB/s; --hbm-tbps to change). `floor_pct` = floor_us / kernel_us.
- `sdpa_us`: torch SDPA with an explicit boolean mask over K/V already gathered into a padded
  contiguous [R, Hkv, kv_max, D] (the gather itself is NOT timed: the baseline is favoured).

Writes bench_tree_attention.json and .md (machine, versions, date) to --out-dir (default $OUT
or the current directory). Exits with a message and status 0 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
from pathlib import Path

import torch

HQ, HKV, D, BS = 32, 8, 128, 16


def _random_parents(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def _setup(batch: int, prefix: int, nodes: int, dtype: torch.dtype, seed: int = 0) -> dict:
    from kernels.tree_masks import ancestor_words

    rng = random.Random(seed)
    dev = "cuda"
    kv_len = prefix + nodes
    mb = -(-kv_len // BS)
    nb = batch * mb
    perm = torch.randperm(nb, device=dev).view(batch, mb).to(torch.int32)
    k_cache = torch.randn(nb, BS, HKV, D, device=dev, dtype=dtype)
    v_cache = torch.randn(nb, BS, HKV, D, device=dev, dtype=dtype)
    q = torch.randn(batch * nodes, HQ, D, device=dev, dtype=dtype)
    cu = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * nodes
    prefix_lens = torch.full((batch,), prefix, device=dev, dtype=torch.int32)
    parents = [_random_parents(nodes, rng) for _ in range(batch)]
    mask = None
    if nodes > 1:
        mask = torch.cat([ancestor_words(p) for p in parents]).to(dev)
    return {
        "q": q,
        "k": k_cache,
        "v": v_cache,
        "cu": cu,
        "prefix": prefix_lens,
        "bt": perm,
        "mask": mask,
        "nodes": nodes,
        "kv_len": kv_len,
    }


def _sdpa_inputs(s: dict) -> tuple[torch.Tensor, ...]:
    """Padded, gathered K/V and an explicit [R, 1, n, kv] mask (built once, not timed)."""
    from kernels.tree_masks import tree_mask_dense

    batch, n, kv = s["bt"].shape[0], s["nodes"], s["kv_len"]
    pos = torch.arange(kv, device="cuda")
    blocks = s["bt"][:, pos // BS].long()  # [R, kv]
    k = s["k"][blocks, pos % BS].permute(0, 2, 1, 3).contiguous()  # [R, Hkv, kv, D]
    v = s["v"][blocks, pos % BS].permute(0, 2, 1, 3).contiguous()
    q = s["q"].view(batch, n, HQ, D).transpose(1, 2)  # [R, Hq, n, D]
    allowed = torch.ones(batch, 1, n, kv, dtype=torch.bool, device="cuda")
    tri = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    for r in range(batch):
        new = tri
        if s["mask"] is not None:
            new = tri & tree_mask_dense(s["mask"][r * n : (r + 1) * n], n)
        allowed[r, 0, :, kv - n :] = new
    return q, k, v, allowed


def _bytes(s: dict, elem: int) -> int:
    batch = s["bt"].shape[0]
    kv_bytes = 2 * batch * s["kv_len"] * HKV * D * elem
    q_out = 2 * batch * s["nodes"] * HQ * D * elem
    return kv_bytes + q_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tree_attention vs HBM floor and torch SDPA")
    ap.add_argument("--quick", action="store_true", help="a handful of points")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth, TB/s")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "kernels.bench: no CUDA device (or TRITON_INTERPRET=1); nothing to time. "
            "Run it on a GPU machine.",
            file=sys.stderr,
        )
        return 0

    import triton
    from triton.testing import do_bench

    from kernels.tree_attention import tree_attention
    from kernels.tree_attention_ref import tree_attention_ref

    dtype = torch.bfloat16
    batches, prefixes, trees = [1, 4, 16, 64], [512, 2048, 8192], [1, 4, 16, 64]
    if args.quick:
        batches, prefixes, trees = [1, 16], [512, 8192], [1, 16]

    # correctness spot check before timing
    s = _setup(2, 100, 8, dtype)
    ref = tree_attention_ref(s["q"], s["k"], s["v"], s["cu"], s["prefix"], s["bt"], s["mask"])
    out = tree_attention(s["q"], s["k"], s["v"], s["cu"], s["prefix"], s["bt"], s["mask"])
    err = (out.float() - ref.float()).abs().max().item()
    if err > 2e-2:
        print(
            f"kernels.bench: kernel disagrees with the reference (max err {err})", file=sys.stderr
        )
        return 1

    rows = []
    for batch in batches:
        for prefix in prefixes:
            for nodes in trees:
                s = _setup(batch, prefix, nodes, dtype)
                args_k = (s["q"], s["k"], s["v"], s["cu"], s["prefix"], s["bt"], s["mask"])
                kern = do_bench(
                    lambda a=args_k, n=nodes: tree_attention(*a, max_q_len=n), return_mode="median"
                )
                q, k, v, allowed = _sdpa_inputs(s)
                sdpa = do_bench(
                    lambda q=q, k=k, v=v, m=allowed: (
                        torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, attn_mask=m, enable_gqa=True
                        )
                    ),
                    return_mode="median",
                )
                floor_us = _bytes(s, 2) / (args.hbm_tbps * 1e12) * 1e6
                rows.append(
                    {
                        "batch": batch,
                        "prefix": prefix,
                        "tree_nodes": nodes,
                        "kernel_us": round(kern * 1e3, 2),
                        "sdpa_us": round(sdpa * 1e3, 2),
                        "floor_us": round(floor_us, 2),
                        "floor_pct": round(100 * floor_us / (kern * 1e3), 1),
                        "speedup_vs_sdpa": round(sdpa / kern, 2),
                    }
                )
                print(rows[-1], flush=True)
                del s, q, k, v, allowed
                torch.cuda.empty_cache()

    meta = {
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bf16",
        "model_shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block_size": BS},
        "hbm_tbps": args.hbm_tbps,
        "timer": "triton.testing.do_bench median",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_tree_attention.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    lines = [
        f"# tree_attention on {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, bf16, 32 q / 8 kv heads, head dim "
        f"128, block 16; HBM floor at {args.hbm_tbps} TB/s; SDPA on pre-gathered K/V.",
        "",
        "| batch | prefix | nodes | kernel us | floor us | % of floor | SDPA us | vs SDPA |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['prefix']} | {r['tree_nodes']} | {r['kernel_us']} | "
        f"{r['floor_us']} | {r['floor_pct']} | {r['sdpa_us']} | {r['speedup_vs_sdpa']}x |"
        for r in rows
    ]
    (out_dir / "bench_tree_attention.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'bench_tree_attention.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
