"""Raw Q4_0 / Q4_1 / Q8_0 tensors of a GGUF file, as int4 QuantizedWeights, without dequantising.

A ggml Q4 block covers 32 consecutive weights of one row (along the input dim): an fp16 scale
d, for Q4_1 an fp16 minimum m, then 16 bytes qs where the low nibble of qs[j] is element j and
the high nibble element j + 16. Q4_0: w = d * (q - 8); Q4_1: w = d * q + m. A Q8_0 block is an
fp16 d and 32 int8 q: w = d * q, held as two 4-bit planes (int4.split_q8), still exact.

Tensor names are mapped to transformers' (blk.3.attn_q.weight ->
model.layers.3.self_attn.q_proj.weight). llama.cpp's converter permutes the rows of
q_proj / k_proj of Llama-family models for its rope layout and transformers' GGUF loader
undoes it; the same row permutation is applied here (blocks run along the input dim, so
permuting rows moves whole blocks and stays exact).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.int4 import GROUP_SIZE, QuantizedWeight, split_q8

Q4_TYPES = ("Q4_0", "Q4_1")
# Block types the int4 kernel computes exactly (Q8_0 as two planes).
EXACT_TYPES = (*Q4_TYPES, "Q8_0")
# Architectures whose converter permutes q/k rows (transformers' LlamaTensorProcessor).
_PERMUTED_ARCHS = ("llama", "mistral")

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF matrix (linears and the embedding), None for others."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def decode_q4(raw: np.ndarray, qtype: str, rows: int, cols: int) -> QuantizedWeight:
    """Q4_0 / Q4_1 block bytes (uint8, rows x cols / 32 blocks) -> QuantizedWeight [rows, cols]."""
    block_bytes = 18 if qtype == "Q4_0" else 20
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP_SIZE, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q4_0":
        zero = np.zeros_like(d)
        qs = blocks[..., 2:]
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d  # d * q + m = (q - 8) * d + (m + 8 d)
        qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # elements 0..15, then 16..31
    return QuantizedWeight(
        torch.from_numpy(q.reshape(rows, cols).astype(np.uint8)),
        torch.from_numpy(d),
        torch.from_numpy(zero),
    )


def decode_q8_0(raw: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    """Q8_0 block bytes (uint8, rows x cols / 32 blocks of 34 bytes) -> two-plane weight."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP_SIZE, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return split_q8(torch.from_numpy(q), torch.from_numpy(d))


def decode_block(raw: np.ndarray, qtype: str, rows: int, cols: int) -> QuantizedWeight:
    return decode_q8_0(raw, rows, cols) if qtype == "Q8_0" else decode_q4(raw, qtype, rows, cols)


def _unpermute_rows(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    """transformers' _reverse_permute_weights, applied to whole rows."""
    rows = qw.shape[0]
    dim = rows // n_head // 2
    index = torch.arange(rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(rows)
    return qw.rows(index)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    part = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(part).decode()
    return part.tolist()[0]


def exact_int4_tensors(path: Path, hf_config: Any) -> dict[str, QuantizedWeight]:
    """Every Q4_0 / Q4_1 / Q8_0 matrix of the GGUF file that transformers would load, by HF
    name, with q/k rows in transformers' order."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    out: dict[str, QuantizedWeight] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or t.tensor_type.name not in EXACT_TYPES:
            continue
        cols, rows = (int(x) for x in t.shape)  # GGUF lists dims innermost first
        qw = decode_block(t.data, t.tensor_type.name, rows, cols)
        if arch in _PERMUTED_ARCHS and ".attn_q." in t.name:
            qw = _unpermute_rows(qw, heads)
        elif arch in _PERMUTED_ARCHS and ".attn_k." in t.name:
            qw = _unpermute_rows(qw, kv_heads)
        out[name] = qw
    return out


def q4_summary(path: Path) -> tuple[int, int]:
    """(Q4_0/Q4_1 linear matrices, all linear matrices) among the file's decoder layers."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    q4 = total = 0
    for t in reader.tensors:
        if _BLOCK.match(t.name) and hf_name(t.name) is not None:
            total += 1
            q4 += t.tensor_type.name in Q4_TYPES
    return q4, total
