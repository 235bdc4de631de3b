"""``--quantization``: which weights are served as int4, their cache entry, and loading them.

An int4 cache entry is a model directory (config, tokenizer) whose ``model.safetensors``
holds each linear weight as ``<module>.qweight`` (two 4-bit values a byte), ``.scales`` and
``.zeros`` (server/model/int4.py; ``.planes`` for an 8-bit weight held as two 4-bit planes),
and every other tensor dense. For a GGUF source the Q4_0 / Q4_1 / Q8_0 matrices are repacked
from the file's own blocks (exact: the file's precision, checked against transformers'
dequantised weights while building); any other matrix, and every matrix of a Hugging Face
directory, is quantized round-to-nearest in groups of 32, and its error is logged; except the
LM head, which stays dense unless the source holds it in one of those block types
(QUANTIZE_HEAD_RTN). A tied head (the embedded SmolLM2's Q8_0 embedding) is read as two
planes by the head and densely by the embedding lookup, which touches one row a token. The
entry sits beside the source's conversion entry, keyed by the source and the quantization,
and is written with the same temporary-directory + rename pattern.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from server.model.int4 import (
    TENSOR_SUFFIXES,
    Int4Linear,
    Kernel,
    QuantizedWeight,
    quantize_rtn,
    relative_error,
    supports,
)
from server.model.llama import CausalLM, DecoderSpec
from server.model.model_cache import build_cache_entry, cache_root, source_gguf, write_atomic

logger = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
# In a GGUF conversion entry: [Q4_0/Q4_1 decoder linears, all decoder linears] of its file.
_Q4_NOTE = "specd_q4.json"
_REQUIRED = ("config.json", "model.safetensors", QUANT_FILE)
# The matrices computed by linear layers (the embedding itself stays dense for its lookup).
_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
# Round an LM head that the source holds in no exact block type to int4 too? Off: rounding
# the embedded SmolLM2's Q8_0 head to one int4 plane (relative Frobenius error 0.09) changed
# its greedy answers (Paris -> "L'Étoile ...") where the repacked Q4_1 linears alone did not;
# its two exact planes keep them.
QUANTIZE_HEAD_RTN = False
# A repacked tensor must dequantise to transformers' weights up to this (relative to the
# matrix's largest weight): the two differ only in how d*q + m is rounded.
_EXACT_TOL = 1e-6


# Why int4 on CUDA needs the kernel named: what an H200 measured (make gpu-check).
CUDA_INT4_MEASURED = (
    "torch's tinygemm int4 kernel, the only CUDA one, measured on an H200 at Llama-3-8B shapes "
    "1.0-1.4x a dense bf16 linear at 1 row but 0.1-0.7x at 8-64 rows (speculation's verify "
    "steps) and 0.04x at 512 (prefill), and the whole decode step no faster "
    "(loadtest/results/gpu/2026-12-04-nvidia-h200.md)"
)


def choose_quantization(
    quantization: str,
    model_dir: Path,
    dtype: str,
    device: torch.device,
    int4_kernel: str = "auto",
) -> str:
    """'int4' or 'none' for the resolved model directory.

    auto: int4 when the model came from a GGUF file whose decoder linears are all Q4_0 / Q4_1,
    on CPU, with dtype auto (an explicit --dtype asks for dense weights in that dtype, and
    keeps the fp32 path that matches transformers exactly). int4: on CPU, or on CUDA with
    ``int4_kernel`` tinygemm named (it saves memory, not time there: CUDA_INT4_MEASURED).
    """
    if quantization not in ("auto", "none", "int4"):
        raise ValueError(f"unknown quantization {quantization!r}; choose auto, none or int4")
    if is_int4_entry(model_dir):
        # A directory that holds int4 weights (given as the model) can only be served so.
        if quantization == "none":
            raise ValueError(f"{model_dir} holds int4 weights; use --quantization auto or int4")
        quantization = "int4"
    if quantization == "none":
        return "none"
    if quantization == "int4":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"--quantization int4 runs on CPU or CUDA (got device {device.type}); "
                "use --quantization none"
            )
        if device.type == "cuda" and int4_kernel != "tinygemm":
            raise ValueError(
                f"--quantization int4 on CUDA is slower than bf16: {CUDA_INT4_MEASURED}. "
                "Use --quantization none, or add --int4-kernel tinygemm to take it for its "
                "memory (about 3.4x less for the weights)"
            )
        return "int4"
    if device.type != "cpu" or dtype != "auto":
        return "none"
    from server.model.gguf_q4 import q4_summary

    gguf = source_gguf(model_dir)
    if gguf is None:
        return "none"
    # Reading the GGUF tensor table takes seconds: the answer is kept in the conversion entry.
    note = Path(model_dir) / _Q4_NOTE
    if note.is_file():
        q4, total = json.loads(note.read_text())
    else:
        q4, total = q4_summary(gguf)
        with contextlib.suppress(OSError):  # a read-only cache: read the file each start
            write_atomic(note, json.dumps([q4, total]))
    return "int4" if total and q4 == total else "none"


def is_int4_entry(model_dir: Path) -> bool:
    return (Path(model_dir) / QUANT_FILE).is_file()


def int4_dir(model_dir: Path) -> Path:
    """The int4 cache entry of a model directory (built once), or the directory itself when
    it already is one."""

    model_dir = Path(model_dir)
    if is_int4_entry(model_dir):
        return model_dir
    gguf = source_gguf(model_dir)
    target = cache_root() / f"{model_dir.name}-{_source_key(model_dir, gguf)}-int4"
    return build_cache_entry(target, _REQUIRED, lambda out: build_int4(model_dir, gguf, out))


def _source_key(model_dir: Path, gguf: Path | None) -> str:
    """A hash of where the weights come from: the GGUF file (its conversion entry's name
    already hashes its contents), or a directory's path and its files' sizes and mtimes."""
    h = hashlib.sha256(f"int4-g32-v3:{model_dir.resolve()}:{gguf}".encode())
    for f in [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_int4(model_dir: Path, gguf: Path | None, out: Path) -> None:
    """Writes the int4 entry of ``model_dir`` into ``out`` (see the module docstring)."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(model_dir)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith((".", "specd_")):
            shutil.copy(f, out / f.name)
    raw: dict[str, QuantizedWeight] = {}
    if gguf is not None:
        from server.model.gguf_q4 import exact_int4_tensors

        logger.warning("int4: reading the Q4_0 / Q4_1 / Q8_0 blocks of %s", gguf.name)
        raw = exact_int4_tensors(gguf, hf_config)
    dense: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                dense[name] = f.get_tensor(name)
    embed = "model.embed_tokens.weight"
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    if tied:
        dense.pop("lm_head.weight", None)
        # A tied head quantized gets its own int4 copy of the table (Q4 blocks of the
        # embedding); the lookup keeps the dense one.
        head = (dense[embed], raw.get(embed))
    else:
        head = (dense.pop("lm_head.weight"), raw.get("lm_head.weight"))
    todo = [(n, dense.pop(n), raw.get(n)) for n in list(dense) if _LINEAR.search(n)]
    todo.append(("lm_head.weight", *head))
    tensors: dict[str, torch.Tensor] = {}
    exact, rtn_errors = 0, []
    for i, (name, w, qw) in enumerate(todo, 1):
        if not supports(tuple(w.shape)):
            logger.warning("int4: %s %s stays dense (input dim not in groups of 32)", name, w.shape)
            tensors[name] = w.contiguous()
            continue
        repacked = qw is not None and _matches(qw, w)
        if name == "lm_head.weight" and not repacked and not QUANTIZE_HEAD_RTN:
            logger.warning("int4: the LM head stays dense (not Q4_0/Q4_1/Q8_0 in the source)")
            if not tied:
                tensors[name] = w.contiguous()
            continue
        if repacked:
            exact += 1
        else:
            if qw is not None:
                logger.warning("int4: %s's Q4 blocks differ from its weights; re-quantizing", name)
            qw = quantize_rtn(w)
            rtn_errors.append((name, relative_error(w, qw)))
        tensors.update(qw.to_tensors(name.removesuffix(".weight")))
        if i % 16 == 0 or i == len(todo):
            logger.warning("int4: %d/%d matrices (%.1f s)", i, len(todo), time.perf_counter() - t0)
    tensors.update({n: t.contiguous() for n, t in dense.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file leaves it private; entries are shared
    summary: dict[str, Any] = {
        "method": "int4",
        "group_size": 32,
        "source": str(gguf or model_dir),
        "repacked_exact": exact,
        "round_to_nearest": len(rtn_errors),
    }
    if rtn_errors:
        errs = torch.tensor([e for _, e in rtn_errors])
        worst = max(rtn_errors, key=lambda e: e[1])
        summary["rtn_relative_frobenius_error"] = {
            "mean": float(errs.mean()),
            "max": float(errs.max()),
            "max_at": worst[0],
        }
        logger.warning(
            "int4: %d matrices round-to-nearest: relative Frobenius error mean %.4f, max %.4f (%s)",
            len(rtn_errors),
            errs.mean(),
            errs.max(),
            worst[0],
        )
    logger.warning(
        "int4: %d matrices repacked exactly from the file; entry written in %.1f s",
        exact,
        time.perf_counter() - t0,
    )
    (out / QUANT_FILE).write_text(json.dumps(summary, indent=1))


def _matches(qw: QuantizedWeight, w: torch.Tensor) -> bool:
    if tuple(qw.shape) != tuple(w.shape):
        return False
    w = w.float()
    return bool((qw.dequantize() - w).abs().max() <= _EXACT_TOL * w.abs().max().clamp_min(1e-30))


def read_int4_tensors(path: Path) -> tuple[dict[str, QuantizedWeight], list[str]]:
    """An int4 entry's quantized weights by module name, and the names of its dense tensors."""
    quant: dict[str, dict[str, torch.Tensor]] = {}
    dense_names: list[str] = []
    with safe_open(path / "model.safetensors", framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118
            for suffix in TENSOR_SUFFIXES:
                if name.endswith(suffix):
                    quant.setdefault(name.removesuffix(suffix), {})[suffix] = f.get_tensor(name)
                    break
            else:
                dense_names.append(name)
    return {
        module: QuantizedWeight.from_tensors(
            t[".qweight"], t[".scales"], t[".zeros"], int(t[".planes"][0]) if ".planes" in t else 1
        )
        for module, t in quant.items()
    }, dense_names


# Our fused modules and the checkpoint modules stacked into them, in row order.
_FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.down_proj": ("mlp.down_proj",),
}


def int4_layers(spec: DecoderSpec, quant: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """Our module name -> its QuantizedWeight (fused parts stacked), for the modules whose
    parts are all quantized."""
    out: dict[str, QuantizedWeight] = {}
    for i in range(spec.num_layers):
        for ours, parts in _FUSED_PARTS.items():
            names = [f"model.layers.{i}.{p}" for p in parts]
            if all(n in quant for n in names):
                out[f"model.layers.{i}.{ours}"] = QuantizedWeight.cat([quant[n] for n in names])
    if "lm_head" in quant:
        out["lm_head"] = quant["lm_head"]
    return out


def drop_dense_weights(model: CausalLM, modules: list[str]) -> None:
    """On the meta-device model: removes the weights that int4 replaces, so that
    ``to_empty`` does not allocate them."""
    for name in modules:
        if name == "lm_head" and model.lm_head is None:
            continue
        lin = model.get_submodule(name)
        del lin.weight
        lin.register_parameter("weight", None)


def install_int4(
    model: CausalLM, layers: dict[str, QuantizedWeight], kernel: Kernel | None = None
) -> None:
    """Replaces each named linear of the materialised model by an Int4Linear (its bias stays
    a parameter for the checkpoint to fill), and the LM head by a RescoredInt4Head
    (server/model/int4_head.py). A tied head with int4 weights gets its own copy of the
    table: the head reads the packed copy, the embedding lookup the dense one."""
    from server.model.int4_head import RescoredInt4Head

    for name, qw in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        bias = None if old is None else old.bias
        module = (
            RescoredInt4Head(qw, bias, kernel=kernel)
            if name == "lm_head"
            else Int4Linear(qw, bias, kernel=kernel)
        )
        setattr(parent, attr, module)
