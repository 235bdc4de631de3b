"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from server.model.cpu_linear import linear


class Linear(nn.Linear):
    """nn.Linear whose forward uses ``linear`` (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim.

    Computed in at least float32 (bf16 inputs are upcast, as transformers does) so that bf16
    models match the reference; float64 inputs stay float64.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of a HF config, whichever transformers version wrote it.

    transformers >= 5 keeps them in ``config.rope_parameters`` (with rope_theta inside); older
    configs have ``rope_theta`` + ``rope_scaling``.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for rope types default, linear and llama3.

    Computed in `dtype` the way transformers does (float32 for fp32/bf16 models), so positions
    rotate bit-for-bit like the reference the checkpoints were validated with.
    """
    base = float(params["rope_theta"])
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim
    inv_freq = 1.0 / (base**exponent)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly (transformers' _compute_llama3_parameters).
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(
        f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


class RotaryEmbedding:
    """Rotary position embedding in the rotate-half (GPT-NeoX / HF Llama) layout.

    Not an nn.Module on purpose: it holds no weights, so building the model on the meta device
    and loading a checkpoint never touches it. cos/sin are computed once per forward for the
    step's positions ([T, D], cheap) and shared by all layers.
    """

    def __init__(self, head_dim: int, params: dict[str, Any]) -> None:
        self.head_dim = head_dim
        self.params = params
        self._inv_freq: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D] in `dtype` (broadcast over heads)."""
        calc = torch.promote_types(dtype, torch.float32)
        key = (positions.device, calc)
        if key not in self._inv_freq:
            inv = rope_inv_freq(self.head_dim, self.params, calc)
            self._inv_freq[key] = inv.to(positions.device)
        freqs = positions.to(calc)[:, None] * self._inv_freq[key][None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D]."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused [2I, H] matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
