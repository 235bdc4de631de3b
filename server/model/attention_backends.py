"""The attention backend by name (``--attention-backend``): torch, cpu, triton or auto.

Above the backend modules, so none imports another.
"""

from __future__ import annotations

import os

import torch

from server.model import attention_cpu, int4_avx2
from server.model.attention import AttentionBackend, TorchAttentionBackend


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name`; "auto" = triton on CUDA when it imports, on CPU specd's
    paged-attention kernel where it builds, else torch."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        kernel = attention_cpu.load() if device.type == "cpu" else None
        if kernel is not None:
            return attention_cpu.CpuAttentionBackend(kernel)
        if name == "cpu":
            raise ValueError(
                "attention backend 'cpu' needs a CPU with AVX2 and FMA, a C++ compiler and "
                f"ninja ({int4_avx2.unavailable_reason() or 'the kernel failed to build'}); "
                "use --attention-backend torch"
            )
        return TorchAttentionBackend()
    if name in ("triton", "auto"):
        backend = _triton_backend(device, explicit=name == "triton")
        if backend is not None:
            return backend
        if name == "triton":
            raise ValueError(
                "attention backend 'triton' needs CUDA (or TRITON_INTERPRET=1) and the triton "
                "package; use --attention-backend torch"
            )
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (choose torch, cpu, triton or auto)")


def _triton_backend(device: torch.device, explicit: bool) -> AttentionBackend | None:
    """server/model/attention_triton.py's backend, or None where it cannot run.

    Imported lazily: it needs triton, which CPU installs may lack.
    On CPU only an explicit request under TRITON_INTERPRET=1 gets it (kernel tests).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (explicit and interpret):
        return None
    try:
        from server.model.attention_triton import TritonAttentionBackend
    except ImportError:
        return None
    return TritonAttentionBackend()
