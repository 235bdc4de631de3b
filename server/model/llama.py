"""One decoder for the Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3.

The architectures differ only in a few switches (DecoderSpec): Qwen2 has q/k/v biases, Qwen3
RMS-normalises q and k per head before rope and sets head_dim explicitly. Parameter names
follow transformers' checkpoints except two fused matmuls (q/k/v -> qkv_proj, gate/up ->
gate_up_proj); ``CausalLM.load_weight`` maps checkpoint tensors onto them.

Inputs are the flattened tokens of the whole batch (T rows); the paged KV cache and the
AttentionMetadata say which request each row belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from server.model.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from server.model.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary,
    linear,
    rope_parameters,
)


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a decoder, read from a HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict[str, Any]
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Keys further back than this are invisible to the model (Mistral 7B v0.1: 4096). We do
    # not implement the window; the runner caps max_model_len at it instead, where full and
    # windowed attention agree.
    sliding_window: int | None = None


def _common(config: Any, **switches: Any) -> DecoderSpec:
    heads = config.num_attention_heads
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        rope=rope_parameters(config),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        **switches,
    )


def _llama(config: Any) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(
        config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
    )


def _mistral(config: Any) -> DecoderSpec:
    return replace(_llama(config), sliding_window=getattr(config, "sliding_window", None))


def _qwen2(config: Any) -> DecoderSpec:
    # Qwen2 configs carry a sliding_window that only applies with use_sliding_window.
    window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
    return _common(config, qkv_bias=True, sliding_window=window)


def _qwen3(config: Any) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, qkv_bias=bias, o_bias=bias, qk_norm=True)


# config.architectures[0] -> how to read its DecoderSpec.
ARCHITECTURES: dict[str, Callable[[Any], DecoderSpec]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
}


def decoder_spec(config: Any) -> DecoderSpec:
    """The DecoderSpec of a HF config; ValueError for architectures we do not implement."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch](config)
    raise ValueError(f"unsupported architecture {archs}; supported: {', '.join(ARCHITECTURES)}")


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes this layer's new K/V into k_cache/v_cache."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # Qwen3: per-head norm before rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = backend.forward(q, k, v.contiguous(), k_cache, v_cache, attn, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


# Checkpoint tensor name -> (our parameter, shard) for the fused matmuls.
_FUSED = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_FUSED_TARGET = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


class CausalLM(nn.Module):
    """Decoder + LM head over flattened tokens and a paged KV cache."""

    def __init__(self, spec: DecoderSpec, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = (
            None
            if spec.tie_word_embeddings
            else Linear(spec.hidden_size, spec.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope)
        self.backend: AttentionBackend = backend or TorchAttentionBackend()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, H] (final-normed).

        kv_cache [num_layers, 2, num_blocks, block_size, Hk, D]; this step's K/V are written.
        """
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        if attn.backend_state is None:
            self.backend.prepare(attn)
        for i, layer in enumerate(self.model.layers):
            # Same residual order as transformers, so fp32 sums round identically.
            residual = h
            h = layer.self_attn(
                layer.input_layernorm(h),
                cos,
                sin,
                attn,
                kv_cache[i, 0],
                kv_cache[i, 1],
                self.backend,
            )
            h = residual + h
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        if self.lm_head is None:
            return linear(hidden, self.model.embed_tokens.weight).float()
        # A Linear, or a RescoredInt4Head (server/model/int4_head.py; a tied one then holds an
        # int4 copy of the embedding table while the lookup reads the dense one).
        return self.lm_head(hidden).float()

    # ---- weight loading -------------------------------------------------------------------

    def load_weight(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Copies one checkpoint tensor into our parameters; returns the keys it filled.

        Keys are parameter names, suffixed with ``#shard`` for slices of fused matmuls.
        """
        if name.endswith("rotary_emb.inv_freq"):
            return []
        if name == "lm_head.weight" and self.lm_head is None:
            return []  # tied: the head is the embedding (some checkpoints store both)
        if not hasattr(self, "_params"):
            self._params = dict(self.named_parameters())
        params = self._params
        m = _FUSED.match(name)
        if m:
            prefix, part, kind = m.groups()
            target = f"{prefix}.{_FUSED_TARGET[part]}.{kind}"
            lo, hi = self._shard_range(part)
            param = params[target]
            assert hi - lo == tensor.shape[0], f"{name}: {tuple(tensor.shape)} vs {hi - lo}"
            with torch.no_grad():
                param[lo:hi].copy_(tensor)
            return [f"{target}#{part}"]
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint {tuple(tensor.shape)} vs model {param.shape}")
        with torch.no_grad():
            param.copy_(tensor)
        return [name]

    def _shard_range(self, part: str) -> tuple[int, int]:
        s = self.spec
        q, kv, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
        return {
            "q_proj": (0, q),
            "k_proj": (q, q + kv),
            "v_proj": (q + kv, q + 2 * kv),
            "gate_proj": (0, inter),
            "up_proj": (inter, 2 * inter),
        }[part]

    def finish_loading(self, loaded: set[str]) -> set[str]:
        """The keys that should have been filled but were not (empty = complete)."""
        self.__dict__.pop("_params", None)
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            fused = name.rsplit(".", 2)
            if len(fused) == 3 and fused[1] == "qkv_proj":
                expected |= {f"{name}#{p}" for p in ("q_proj", "k_proj", "v_proj")}
            elif len(fused) == 3 and fused[1] == "gate_up_proj":
                expected |= {f"{name}#{p}" for p in ("gate_proj", "up_proj")}
            else:
                expected.add(name)
        return expected - loaded
