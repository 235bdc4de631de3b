"""`specd serve`: flags named as in vLLM where the concept is the same.

Precedence: built-in defaults < `--config FILE` (YAML, the SpecdConfig tree) < flags given on
the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from server.cli_env import apply_env, unknown_env
from server.config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SpecdConfig,
    SpeculativeConfig,
    parse_size,
)
from server.log_format import configure_logging
from server.spec_decode.policies import available_policies

# flag dest -> (config section, field). Sections: model, cache, scheduler, server, engine.
_FLAG_TO_FIELD: dict[str, tuple[str, str]] = {
    "model": ("model", "model"),
    "served_model_name": ("model", "served_model_name"),
    "dtype": ("model", "dtype"),
    "max_model_len": ("model", "max_model_len"),
    "device": ("model", "device"),
    "seed": ("model", "seed"),
    "cpu_linear_plan": ("model", "cpu_linear_plan"),
    "cpu_threads": ("model", "cpu_threads"),
    "kernel_threads": ("model", "kernel_threads"),
    "quantization": ("model", "quantization"),
    "int4_kernel": ("model", "int4_kernel"),
    "block_size": ("cache", "block_size"),
    "kv_cache_memory": ("cache", "kv_cache_memory"),
    "num_kv_blocks": ("cache", "num_blocks"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "enable_chunked_prefill": ("scheduler", "enable_chunked_prefill"),
    "attention_backend": ("engine", "attention_backend"),
    "host": ("server", "host"),
    "port": ("server", "port"),
    "api_key": ("server", "api_keys"),
    "log_level": ("server", "log_level"),
    "log_format": ("server", "log_format"),
    "allowed_origins": ("server", "allowed_origins"),
    "allowed_methods": ("server", "allowed_methods"),
    "allowed_headers": ("server", "allowed_headers"),
    "allow_credentials": ("server", "allow_credentials"),
    "max_num_queued_reqs": ("server", "max_num_queued_reqs"),
    "max_num_queued_tokens": ("server", "max_num_queued_tokens"),
    "max_request_body_bytes": ("server", "max_request_body_bytes"),
    "request_timeout": ("server", "request_timeout_s"),
    "log_prompts": ("server", "log_prompts"),
    "shutdown_timeout": ("server", "shutdown_timeout_s"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        epilog="Every flag can also be set by an environment variable: SPECD_ and the flag's "
        "name in capitals, '-' as '_' (--max-num-seqs 8 is SPECD_MAX_NUM_SEQS=8; on/off flags "
        "take true/false; flags with several values take them comma-separated). The command "
        "line wins over the environment, which wins over --config.",
    )
    # Every default is None so that only flags the user typed override the YAML file.
    a = serve.add_argument
    a("model_tag", nargs="?", default=None, help="the model, as vLLM's positional argument")
    a("--model", help="HF directory, .gguf file or embedded name (default smollm2-135m-instruct)")
    a("--served-model-name", help="the name clients send as 'model'")
    a("--config", help="YAML file with the SpecdConfig tree (see configs/)")
    a("--dtype", choices=["auto", "float32", "float16", "bfloat16", "float64"])
    a("--device", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int)
    a(
        "--cpu-linear-plan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time few-row linears at start-up on CPU and take the cheapest way (default on)",
    )
    a(
        "--cpu-threads",
        type=int,
        help="torch intra-op threads on CPU (default 0: usable cores - 1, one left to the API "
        "process)",
    )
    a(
        "--kernel-threads",
        type=int,
        help="threads of specd's own CPU kernels (int4 linears, paged attention); a call never "
        "waits for a thread to wake, so a core the API process takes costs only its share "
        "(default 0: usable cores)",
    )
    a(
        "--quantization",
        choices=["auto", "none", "int4"],
        help="int4: 4-bit linear weights (a Q4_0/Q4_1 GGUF's blocks repacked as they are, other "
        "weights rounded to nearest in groups of 32); on CPU, or on CUDA with --int4-kernel "
        "tinygemm (less memory, slower than bf16 there). auto (default): int4 for a Q4 GGUF on "
        "CPU with --dtype auto, else none",
    )
    a(
        "--int4-kernel",
        choices=["auto", "avx2", "aten", "tinygemm"],
        help="the kernel of int4 linears. CPU: avx2 (specd's float32 kernel, built on first use "
        "where the CPU has AVX2 and FMA), aten (torch's bf16 kernel); CUDA: tinygemm (torch's, "
        "which --quantization int4 there needs named); auto (default): on CPU the faster here, "
        "timed at load",
    )
    a("--max-model-len", type=int)
    a("--block-size", type=int)
    a("--kv-cache-memory", type=parse_size, help="KV cache bytes, e.g. 2GiB")
    a("--num-kv-blocks", type=int, help="exact KV block count (overrides --kv-cache-memory)")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    a("--max-num-seqs", type=int)
    a("--max-num-batched-tokens", type=int)
    a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    a("--attention-backend", choices=["auto", "torch", "cpu", "triton"])
    a(
        "--speculative-config",
        help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    )
    a("--draft-model", help="shorthand for a draft_model speculative config")
    a("--host")
    a("--port", type=int)
    a(
        "--api-key",
        nargs="+",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes; several keys may be given "
        "(SPECD_API_KEY: comma-separated)",
    )
    a("--log-level", choices=["debug", "info", "warning", "error"])
    a("--log-format", choices=["text", "json"], help="json: one JSON object a line (default text)")
    a(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help="answer CORS requests from these origins ('*' for any); default: no CORS headers",
    )
    a("--allowed-methods", nargs="+", metavar="METHOD", help="CORS methods (default '*')")
    a("--allowed-headers", nargs="+", metavar="HEADER", help="CORS request headers (default '*')")
    a(
        "--allow-credentials",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CORS: allow cookies and Authorization from browsers (default off)",
    )
    a(
        "--max-num-queued-reqs",
        type=int,
        help="requests waiting for their first token before new ones get 503 (default 256)",
    )
    a(
        "--max-num-queued-tokens",
        type=int,
        help="prompt tokens of those waiting requests before new ones get 503 (default 262144)",
    )
    a(
        "--shutdown-timeout",
        type=float,
        help="on SIGTERM, seconds to let requests in flight finish (default 30)",
    )
    a(
        "--log-prompts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log each request's prompt text, not only its id and sizes (default off)",
    )
    a(
        "--request-timeout",
        type=float,
        help="seconds a generation request may take, queueing included, before 408 (default none)",
    )
    a(
        "--max-request-body-bytes",
        type=parse_size,
        help="larger request bodies get 413 (default 8MiB)",
    )
    return parser


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` subcommand's own parser (its flags are what SPECD_* variables name)."""
    for action in parser._actions:  # argparse offers no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise LookupError("no serve subcommand")


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SpecdConfig:
    """The config from flags, then SPECD_* variables (``environ``, default os.environ) for the
    flags not given, then the YAML file, then the defaults."""
    if args.model_tag and not args.model:
        args.model = args.model_tag
    apply_env(serve_parser(build_parser()), args, environ)
    base = SpecdConfig.from_yaml(args.config) if args.config else SpecdConfig()
    sections: dict[str, dict[str, Any]] = {
        "model": {},
        "cache": {},
        "scheduler": {},
        "server": {},
        "engine": {},
    }
    for dest, (section, name) in _FLAG_TO_FIELD.items():
        value = getattr(args, dest, None)
        if value is not None:
            sections[section][name] = value
    engine = base.engine
    spec = engine.speculative
    if args.speculative_config:
        spec = SpeculativeConfig.from_json(args.speculative_config)
    if args.draft_model:
        spec = dataclasses.replace(
            spec,
            method="draft_model",
            model=args.draft_model,
            num_speculative_tokens=spec.num_speculative_tokens or 4,
        )
    engine = dataclasses.replace(
        engine,
        model=_merge(ModelConfig, engine.model, sections["model"]),
        cache=_merge(CacheConfig, engine.cache, sections["cache"]),
        scheduler=_merge(SchedulerConfig, engine.scheduler, sections["scheduler"]),
        speculative=spec,
        **sections["engine"],
    )
    server = _merge(ServerConfig, base.server, sections["server"])
    policies = available_policies()
    if engine.speculative.policy not in policies:
        # Said before the model loads, not after a minute of start-up.
        raise ValueError(
            f"unknown speculation policy {engine.speculative.policy!r}; choose one of "
            f"{', '.join(policies)}"
        )
    return SpecdConfig(engine=engine, server=server)


def _merge(cls: type, current: Any, overrides: dict[str, Any]) -> Any:
    assert isinstance(current, cls)
    return dataclasses.replace(current, **overrides) if overrides else current


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(config.server.log_level, config.server.log_format)
    for name in unknown_env(serve_parser(parser)):
        logging.getLogger("specd").warning("%s is not a specd serve setting; ignored", name)
    if args.command == "serve":
        import asyncio

        from server.api.app import serve

        try:
            asyncio.run(serve(config))
        except KeyboardInterrupt:
            # uvicorn drained HTTP and the engine was shut down; it re-raises the SIGINT it
            # caught so the process ends as interrupted. That is a normal stop, not an error.
            logging.getLogger("specd").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
