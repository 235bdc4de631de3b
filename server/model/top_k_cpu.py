"""The target's top-k next tokens and their probabilities per logit row, on CPU through specd's
AVX2 kernel (kernels/cpu/top_k.cpp), for the drafters that recycle them (Token Recycling).

torch's topk plus logsumexp over a 49k vocabulary on the engine's one torch thread took 0.8 ms
at 8 rows (a batch-8 decode step) and 8.4 ms at 72 (8 requests' 9-node trees), paid whether
or not the step drafts; the kernel, reading each row twice, vectorised, on specd's kernel
threads, 0.10 and 1.24 ms (``python -m loadtest.bench_top_k``,
loadtest/results/engine/top-k.md). Where it can't be built (no AVX2/FMA, compiler or ninja)
the torch ops remain.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from server.model import int4_avx2

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "cpu" / "top_k.cpp"
# The kernel keeps each row's candidates in a fixed-size list.
MAX_K = 64


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel, or None where it can't be had (logged once). It runs on the int4
    extension's threads (--kernel-threads), as the attention kernel does."""
    kernel = int4_avx2.load_extension("specd_top_k", SOURCE, "top-k kernel", "torch's topk")
    threads = int4_avx2.load()
    if kernel is not None and threads is not None:
        kernel.use_pool(threads.pool_handle())
    return kernel


def top_k_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [N, V]: the ``k`` likeliest token ids (int32) and their softmax
    probabilities (float32), best first."""
    k = min(k, logits.shape[-1])
    kernel = load() if logits.device.type == "cpu" and k <= MAX_K else None
    if kernel is not None:
        return kernel.top_k_probs(logits.float(), k)
    return torch_top_k_probs(logits, k)


def torch_top_k_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops (any device; the reference the kernel is tested against)."""
    top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    probs = (top.values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return top.indices.to(torch.int32), probs.float()
