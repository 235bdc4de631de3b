"""Find a model (directory, .gguf file or embedded name), convert GGUF once, load our model.

GGUF files are dequantised by transformers (about 20 s for SmolLM2 on 2 cores) and saved as
safetensors + tokenizer into a cache directory, so every later start loads in seconds. The cache
entry is written into a temporary sibling directory and renamed into place: a crash mid-way
leaves a stale ``.tmp-*`` directory, never a half-written entry that looks complete.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from server.model.attention import AttentionBackend
from server.model.embedded import embedded_names, find_embedded
from server.model.int4 import TENSOR_SUFFIXES
from server.model.llama import CausalLM, decoder_spec
from server.model.model_cache import build_cache_entry, gguf_cache_dir, record_source

logger = logging.getLogger(__name__)

_REQUIRED_FILES = ("config.json", "model.safetensors")


def resolve_model(spec: str) -> Path:
    """A Hugging Face directory (config.json + safetensors + tokenizer) for `spec`.

    `spec` is a model directory, a .gguf file (converted once into the cache) or the name of an
    embedded model (server/model/embedded.py).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return convert_gguf(path)
    embedded = find_embedded(spec)
    if embedded is not None:
        return convert_gguf(embedded.path())
    raise ValueError(
        f"model {spec!r} is neither a directory, a .gguf file nor an embedded model "
        f"(embedded: {', '.join(embedded_names())})"
    )


def convert_gguf(gguf_path: Path) -> Path:
    """Converts a GGUF file to a cached safetensors directory (once) and returns it."""
    target = gguf_cache_dir(gguf_path)
    build_cache_entry(target, _REQUIRED_FILES, lambda out: _convert_into(gguf_path, out))
    record_source(target, gguf_path)
    return target


def _convert_into(gguf_path: Path, out: Path) -> None:
    # Imported here: transformers' GGUF path is only needed on the first start.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.warning(
        "converting %s to safetensors in %s (once; ~20 s for a 135M model)", gguf_path, out
    )
    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    logger.warning("dequantised in %.1f s; saving", time.perf_counter() - t0)
    # The weights are plain fp32 now; drop the GGUF marks, else save_pretrained refuses
    # ("quantized with gguf, not serializable") and config.json would claim a quantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, max_shard_size="100GB")
    tokenizer.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) and not _has_chat_template(out):
        # Older transformers keep the template only inside tokenizer_config.json; make sure it
        # travels either way.
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    logger.warning("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    return cfg.is_file() and "chat_template" in json.loads(cfg.read_text())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }[dtype]


def load_model(
    path: Path,
    dtype: str = "auto",
    device: str = "auto",
    backend: AttentionBackend | None = None,
    quantization: str = "none",
    int4_kernel: str = "auto",
) -> tuple[CausalLM, Any, Any]:
    """Builds our model from config.json and loads its safetensors weights.

    Returns (model, hf_config, tokenizer); the model is in eval mode on `device` in `dtype`
    (dtype/device "auto": bfloat16 on CUDA, float32 on CPU). `backend` defaults to torch.
    `quantization` (auto, none, int4) is resolved by server/model/quantize.py; int4 loads the
    linears from the model's int4 cache entry (built on first use), computed by
    ``int4_kernel`` (auto, avx2, aten, tinygemm: server/model/int4.py's choose_kernel).
    """
    from transformers import AutoConfig, AutoTokenizer

    from server.model import quantize
    from server.model.int4 import choose_kernel

    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    int4 = quantize.choose_quantization(quantization, path, dtype, dev, int4_kernel) == "int4"
    if int4:
        # Each kernel's activation dtype: float32 on CPU (its kernels' accuracy is stated
        # for it), bfloat16 on CUDA (tinygemm's).
        wants = torch.float32 if dev.type == "cpu" else torch.bfloat16
        if dt != wants:
            raise ValueError(
                f"--quantization int4 on {dev.type} needs {str(wants).removeprefix('torch.')} "
                f"activations (--dtype auto or {str(wants).removeprefix('torch.')}); "
                f"got --dtype {dtype}"
            )
        path = quantize.int4_dir(path)
    hf_config = AutoConfig.from_pretrained(path)
    spec = decoder_spec(hf_config)
    t0 = time.perf_counter()
    # Built on the meta device: no random init of weights that the checkpoint overwrites.
    with torch.device("meta"):
        model = CausalLM(spec, backend)
    if int4:
        quant, _ = quantize.read_int4_tensors(path)
        layers = quantize.int4_layers(spec, quant)
        quantize.drop_dense_weights(model, list(layers))
        model = model.to_empty(device=dev).to(dt)
        kernel = choose_kernel(int4_kernel, dev.type)
        quantize.install_int4(model, layers, kernel)
        logger.info("int4: %d linear layers from %s, %s kernel", len(layers), path, kernel)
    else:
        model = model.to_empty(device=dev).to(dt)
    load_weights(model, path, dt, dev)
    model.eval()
    logger.info("loaded %s weights in %.2f s", hf_config.architectures, time.perf_counter() - t0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, hf_config, tokenizer


def load_weights(model: CausalLM, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Copies every safetensors tensor into the model, via model.load_weight's name mapping.

    Raises ValueError naming any model parameter that no checkpoint tensor filled.
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files")
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(TENSOR_SUFFIXES):
                    continue  # int4 weights: installed by server/model/quantize.py
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                loaded.update(model.load_weight(name, tensor))
    missing = model.finish_loading(loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights for {sorted(missing)[:8]} ...")


def eos_token_ids(path: Path, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, united."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)
