"""SPECD_* environment variables: every `specd serve` flag has one; the command line wins over
the environment, which wins over --config; bad values are refused under the variable's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args, serve_parser
from server.cli_env import env_name, flag_actions, unknown_env
from server.config import SpecdConfig
from tests.api.live_server import REPO_ROOT


def config(argv: list[str], environ: dict[str, str]) -> SpecdConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]), environ)


def test_every_flag_has_a_variable() -> None:
    parser = serve_parser(build_parser())
    options = {
        o
        for action in parser._actions
        for o in action.option_strings
        if o.startswith("--") and not o.startswith("--no-") and o != "--help"
    }
    assert {env_name(o) for o in options} == set(flag_actions(parser))
    assert "SPECD_MAX_NUM_SEQS" in flag_actions(parser)


def test_values_typed_as_the_flags() -> None:
    c = config(
        [],
        {
            "SPECD_MODEL": "/models/x",
            "SPECD_MAX_NUM_SEQS": "8",
            "SPECD_KV_CACHE_MEMORY": "1GiB",
            "SPECD_ENABLE_PREFIX_CACHING": "false",
            "SPECD_CPU_LINEAR_PLAN": "off",
            "SPECD_API_KEY": "key-a, key-b",
            "SPECD_LOG_FORMAT": "json",
            "SPECD_ALLOWED_ORIGINS": "http://a.example,http://b.example",
            "SPECD_ALLOW_CREDENTIALS": "1",
            "SPECD_SHUTDOWN_TIMEOUT": "12.5",
            "SPECD_SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 3}',
            "SPECD_HOST": "0.0.0.0",
        },
    )
    assert c.engine.model.model == "/models/x"
    assert c.engine.scheduler.max_num_seqs == 8
    assert c.engine.cache.kv_cache_memory == 2**30
    assert c.engine.cache.enable_prefix_caching is False
    assert c.engine.model.cpu_linear_plan is False
    assert c.server.api_keys == ("key-a", "key-b")
    assert c.server.log_format == "json"
    assert c.server.allowed_origins == ("http://a.example", "http://b.example")
    assert c.server.allow_credentials is True
    assert c.server.shutdown_timeout_s == 12.5
    assert c.engine.speculative.method == "ngram"
    assert c.engine.speculative.num_speculative_tokens == 3
    assert c.server.host == "0.0.0.0"


def test_command_line_wins_over_environment_over_yaml(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "engine:\n  scheduler:\n    max_num_seqs: 4\n    max_num_batched_tokens: 64\n"
    )
    env = {"SPECD_MAX_NUM_SEQS": "8", "SPECD_CONFIG": str(yaml_file)}
    from_env = config([], env)
    assert from_env.engine.scheduler.max_num_seqs == 8  # environment over YAML
    assert from_env.engine.scheduler.max_num_batched_tokens == 64  # YAML where env is silent
    assert config(["--max-num-seqs", "2"], env).engine.scheduler.max_num_seqs == 2
    # vLLM's positional model wins over SPECD_MODEL, as any command-line value does.
    assert config(["/models/cli"], {"SPECD_MODEL": "/models/env"}).engine.model.model == (
        "/models/cli"
    )
    off = config(["--no-enable-prefix-caching"], {"SPECD_ENABLE_PREFIX_CACHING": "true"})
    assert off.engine.cache.enable_prefix_caching is False


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SPECD_MAX_NUM_SEQS", "many", "invalid literal"),
        ("SPECD_LOG_FORMAT", "xml", "choose one of text, json"),
        ("SPECD_ENABLE_PREFIX_CACHING", "maybe", "true/false"),
        ("SPECD_KV_CACHE_MEMORY", "lots", ""),
        ("SPECD_PORT", "", "empty"),
        ("SPECD_API_KEY", "a,,b", "empty"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        config([], {name: value})
    assert says in str(info.value)


def test_unknown_variables_are_named_not_fatal() -> None:
    environ = {"SPECD_MAX_NUM_SEQ": "8", "SPECD_TEST_URL": "x", "SPECD_PORT": "1", "HOME": "/"}
    assert unknown_env(serve_parser(build_parser()), environ) == ["SPECD_MAX_NUM_SEQ"]
    assert config([], environ).engine.scheduler.max_num_seqs != 8


def test_cli_exits_2_naming_the_variable() -> None:
    """The real entry point: a bad variable stops `specd serve` before any model loads."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "SPECD_MAX_NUM_SEQS": "lots"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "SPECD_MAX_NUM_SEQS='lots'" in done.stderr


def test_kubernetes_service_links_are_not_settings() -> None:
    """A Service named `specd` puts these in every pod of its namespace; the server must start
    and keep its own port (vLLM's VLLM_PORT=tcp://... crash)."""
    links = {
        "SPECD_PORT": "tcp://10.96.0.12:8000",
        "SPECD_PORT_8000_TCP": "tcp://10.96.0.12:8000",
        "SPECD_PORT_8000_TCP_ADDR": "10.96.0.12",
        "SPECD_PORT_8000_TCP_PORT": "8000",
        "SPECD_PORT_8000_TCP_PROTO": "tcp",
        "SPECD_SERVICE_HOST": "10.96.0.12",
        "SPECD_SERVICE_PORT": "8000",
        "SPECD_SERVICE_PORT_HTTP": "8000",
    }
    assert unknown_env(serve_parser(build_parser()), links) == []
    assert config([], links).server.port == 8000
    assert config([], {**links, "SPECD_PORT": "9000"}).server.port == 9000
