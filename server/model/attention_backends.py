"""The attention backend by name (``--attention-backend``): torch, triton or auto.

Above both backend modules, so neither imports the other.
"""

from __future__ import annotations

import os

import torch

from server.model.attention import AttentionBackend, TorchAttentionBackend


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name`; "auto" = triton on CUDA when it imports, else torch."""
    if name == "torch":
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
    raise ValueError(f"unknown attention backend {name!r} (choose torch, triton or auto)")


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
