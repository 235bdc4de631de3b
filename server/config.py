"""One frozen config tree. The CLI and YAML files map onto it; everything below takes its part.

Values are validated at construction (``__post_init__``) with a message that says how to fix
them; derived values are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

DType = Literal["auto", "float32", "float16", "bfloat16", "float64"]
AttentionBackendName = Literal["auto", "torch", "cpu", "triton"]
Device = Literal["auto", "cpu", "cuda"]
Quantization = Literal["auto", "none", "int4"]
Int4Kernel = Literal["auto", "avx2", "aten", "tinygemm"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve and how to hold its weights."""

    # A Hugging Face directory, a .gguf file, or an embedded model's name (model/embedded.py).
    model: str = "smollm2-135m-instruct"
    # The name clients send in "model"; defaults to `model` as vLLM does.
    served_model_name: str | None = None
    dtype: DType = "auto"
    # None: the model's own max_position_embeddings.
    max_model_len: int | None = None
    device: Device = "auto"
    seed: int = 0
    # On CPU, time the model's linear shapes at 1..64 rows at start-up (~4 s for SmolLM2) and
    # compute each row count the cheapest measured way (server/model/cpu_linear.py).
    cpu_linear_plan: bool = True
    # torch intra-op threads on CPU; 0 (auto): usable cores - 1, leaving one to the API
    # process (server/model/cpu_threads.py has the measurements).
    cpu_threads: int = 0
    # Threads of specd's own CPU kernels (int4/int8 linears, paged attention), which split
    # each call without ever waiting for a thread to wake (kernels/cpu/work_pool.h); 0 (auto):
    # usable cores, the API process's included (server/model/cpu_threads.py).
    kernel_threads: int = 0
    # Linear weights served as 4-bit (server/model/quantize.py). auto: int4 for a GGUF whose
    # decoder linears are all Q4_0 / Q4_1 (the file's own precision), on CPU with dtype auto;
    # none otherwise. int4: any model, on CPU (float32 activations), or on CUDA (bfloat16) with
    # int4_kernel "tinygemm" named, since it measured slower than bf16 there
    # (quantize.CUDA_INT4_MEASURED); non-Q4 linears are rounded to nearest; the LM head stays
    # dense unless the source holds it in Q4_0 / Q4_1 / Q8_0.
    quantization: Quantization = "auto"
    # Which kernel computes int4 linears (server/model/int4.py). CPU: avx2, specd's float32 one
    # (server/model/int4_avx2.py); aten, torch's bf16 one; auto: the faster here, timed at
    # load. CUDA: tinygemm, torch's (which int4 there needs named).
    int4_kernel: Int4Kernel = "auto"

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "none", "int4"):
            raise ValueError(f"quantization must be auto, none or int4 (got {self.quantization!r})")
        if self.int4_kernel not in ("auto", "avx2", "aten", "tinygemm"):
            raise ValueError(
                f"int4_kernel must be auto, avx2, aten or tinygemm (got {self.int4_kernel!r})"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, 0 for auto (got {self.cpu_threads})")
        if self.kernel_threads < 0:
            raise ValueError(f"kernel_threads must be >= 0, 0 for auto (got {self.kernel_threads})")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    # Bytes of KV cache to allocate. None: a default that suits the device (see the runner).
    kv_cache_memory: int | None = None
    # Overrides kv_cache_memory with an exact block count (tests use this to force preemption).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (got {self.block_size})")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (got {self.num_blocks})")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive bytes, e.g. 2GiB = 2147483648")


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission and the per-step token budget."""

    max_num_seqs: int = 64
    # Tokens computed per step over all requests (prefill chunks + decode + draft tokens).
    max_num_batched_tokens: int = 1024
    # Prefill chunks are cut to fit the budget; off = a prompt is scheduled whole or not at all.
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})"
            )


# Whose tables a recycle drafter learns in and drafts from (server/spec_decode/recycle.py).
RecycleScope = Literal["request", "shared", "layered"]
SPECULATIVE_METHODS = ("auto", "ngram", "tree", "recycle", "suffix", "draft_model", "synthetic")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config shape. method None = no speculation."""

    # None with num_speculative_tokens > 0 means "auto" (speculation asked for, no method named).
    method: (
        Literal["ngram", "tree", "recycle", "suffix", "auto", "draft_model", "synthetic"] | None
    ) = None
    # The most draft tokens (chain length, or tree nodes) one request verifies in one step.
    num_speculative_tokens: int = 0
    # ngram / tree: the suffix lengths matched against the prompt + output.
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # tree: the most distinct continuations merged into one request's tree.
    max_tree_width: int = 4
    # recycle (and auto): the target's top-k kept per token, and whose table drafts a request:
    # one per "request" (measured better than shared: loadtest/results/spec/2026-12-03-drafters.md),
    # "shared" by all requests (the paper's hot start), or "layered" (the request's own rows
    # first, the shared table for the tokens it has not met yet).
    recycle_top_k: int = 8
    recycle_scope: RecycleScope = "request"
    # suffix (and auto): memory cap of the cross-request suffix cache, in MiB.
    suffix_cache_mb: float = 64.0
    # draft_model: the draft model (a path or an embedded name sharing the target's tokenizer).
    model: str | None = None
    # synthetic (benchmarks and tests only): probability that a draft token is the target's own.
    acceptance_rate: float = 0.8
    # Who picks each request's budget every step: goodput (per-request budgets that maximise
    # the batch's goodput), smartspec_uniform (one k for the batch), fixed (every request
    # gets num_speculative_tokens), none.
    policy: str = "goodput"
    # Seconds of start-up profile that seeds the cost model of goodput / smartspec_uniform
    # (0 = none: the model then learns from the first served steps alone).
    cost_profile_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.method is None and self.num_speculative_tokens > 0:
            object.__setattr__(self, "method", "auto")
        if self.method not in (None, *SPECULATIVE_METHODS):
            raise ValueError(
                f"unknown speculative method {self.method!r}; "
                f"choose one of {', '.join(SPECULATIVE_METHODS)}"
            )
        if self.method is not None and self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1 when a method is set")
        if self.method == "draft_model" and not self.model:
            raise ValueError('method "draft_model" needs "model": a path or embedded name')
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.max_tree_width < 1:
            raise ValueError("max_tree_width must be >= 1")
        if self.recycle_top_k < 1:
            raise ValueError("recycle_top_k must be >= 1")
        if self.recycle_scope not in get_args(RecycleScope):
            raise ValueError(f"recycle_scope must be one of {get_args(RecycleScope)}")
        if not self.suffix_cache_mb > 0:
            raise ValueError("suffix_cache_mb must be > 0")
        if not 0.0 <= self.acceptance_rate <= 1.0:
            raise ValueError("acceptance_rate must be in [0, 1]")
        if self.cost_profile_seconds < 0:
            raise ValueError("cost_profile_seconds must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.method is not None and self.policy != "none"

    @classmethod
    def from_json(cls, text: str | None) -> SpeculativeConfig:
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON: {e}") from e
        return _from_dict(cls, data, "--speculative-config")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    attention_backend: AttentionBackendName = "auto"
    # Run the engine core in its own process (the server does); tests may run it in-process.
    separate_process: bool = True


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer keys accepted on /v1 routes; empty: no auth. A YAML string is one key.
    api_keys: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object a line, for log shippers
    # CORS (Starlette's CORSMiddleware). No origins: no CORS headers at all, browsers refuse.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # Seconds a client may take to read before its request is aborted.
    disconnect_poll_interval: float = 0.1
    # Admission (server/api/admission.py): engine requests (choices) admitted without a first
    # token yet, and their prompt tokens. Beyond either, new requests get 503 + Retry-After.
    max_num_queued_reqs: int = 256
    max_num_queued_tokens: int = 262144
    # Larger request bodies get 413 before they are parsed.
    max_request_body_bytes: int = 8 * 2**20
    # Per-request limits, answered with 400 (code "limit_exceeded") naming the parameter.
    max_n: int = 128
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_chars: int = 512
    max_logit_bias_entries: int = 1024
    # On SIGTERM, seconds to let requests in flight finish before stopping (server/api/drain.py).
    shutdown_timeout_s: float = 30.0
    # Log each request's prompt (and not just its id and sizes). Off: prompts are user data.
    log_prompts: bool = False
    # Seconds a generation request may take, queueing included, before it is aborted (408).
    # None: no limit. A request's own "timeout" (specd extension) can only shorten it.
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        # Flags give lists and YAML a list or a single string; the config holds tuples.
        for name in ("api_keys", "allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys: an API key must not be empty")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json' (got {self.log_format!r})")
        positive = (
            "max_num_queued_reqs",
            "max_num_queued_tokens",
            "max_request_body_bytes",
            "max_n",
            "max_stop_strings",
            "max_stop_string_chars",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0 (got {self.shutdown_timeout_s})")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0 (got {self.request_timeout_s})")
        for name in ("max_logprobs", "max_logit_bias_entries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")


@dataclass(frozen=True)
class SpecdConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SpecdConfig:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        return _from_dict(cls, data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Builds a (nested) frozen dataclass from a plain dict, naming unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _dataclass_type(cls, name)
        kwargs[name] = _from_dict(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_NESTED = {
    "SpecdConfig": {"engine": EngineConfig, "server": ServerConfig},
    "EngineConfig": {
        "model": ModelConfig,
        "cache": CacheConfig,
        "scheduler": SchedulerConfig,
        "speculative": SpeculativeConfig,
    },
}


def _dataclass_type(cls: type, name: str) -> type | None:
    return _NESTED.get(cls.__name__, {}).get(name)


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2G', '1000000' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    s = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(s)
