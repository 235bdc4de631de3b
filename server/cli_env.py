"""`SPECD_*` environment variables: every `specd serve` flag can be set by one, the same in
and out of Docker (`--max-num-seqs 8` is `SPECD_MAX_NUM_SEQS=8`).

A variable fills in a flag that the command line did not give, so the precedence is built-in
defaults < `--config` YAML < environment < command line. Each value is converted and checked as
the flag's own parser would, and a bad one is reported under the variable's name.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

PREFIX = "SPECD_"
# SPECD_* variables that are not flags: the model cache's, the test suite's and the fault
# injector's own.
NOT_FLAGS = frozenset({"SPECD_CACHE_DIR", "SPECD_TEST_URL", "SPECD_INJECT_FAULTS"})
# Kubernetes gives every pod variables for each Service in its namespace (service links): for
# a Service named `specd`, SPECD_PORT=tcp://10.0.0.1:8000, SPECD_SERVICE_HOST, SPECD_PORT_8000_TCP
# and more. Those are recognised by their shape and left alone (vLLM hit this with VLLM_PORT).
_SERVICE_LINK_NAME = re.compile(r"SPECD_(SERVICE_(HOST|PORT)(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)\w*)")
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Flags that take several values read them comma-separated from their variable.
_LIST_SEPARATOR = ","


def env_name(option: str) -> str:
    """`--max-num-seqs` -> `SPECD_MAX_NUM_SEQS`."""
    return PREFIX + option.lstrip("-").replace("-", "_").upper()


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The variable name of each of the parser's long options (help excluded)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse offers no public accessor for this
        if isinstance(action, argparse._HelpAction):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs:
            out[env_name(longs[0])] = action
    return out


def apply_env(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Sets each flag the command line left unset (None) from its SPECD_* variable. Raises
    ValueError, naming the variable, for a value the flag would refuse."""
    environ = os.environ if environ is None else environ
    actions = flag_actions(parser)
    for name in sorted(environ):
        if not _is_setting(name, environ[name]):
            continue
        action = actions.get(name)
        if action is not None and getattr(args, action.dest, None) is None:
            setattr(args, action.dest, _convert(name, action, environ[name]))


def unknown_env(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> list[str]:
    """SPECD_* variables that name no flag: typos, logged as warnings (not errors: a typo must
    not stop a server that runs without the setting)."""
    environ = os.environ if environ is None else environ
    actions = flag_actions(parser)
    return sorted(
        name for name, value in environ.items() if _is_setting(name, value) and name not in actions
    )


def _is_setting(name: str, value: str) -> bool:
    """Whether a variable is meant as a specd serve setting (not another tool's, nor a
    Kubernetes service link)."""
    return (
        name.startswith(PREFIX)
        and name not in NOT_FLAGS
        and not _SERVICE_LINK_NAME.fullmatch(name)
        and not _SERVICE_LINK_VALUE.match(value)
    )


def _convert(name: str, action: argparse.Action, raw: str) -> Any:
    value = raw.strip()
    if isinstance(action, argparse.BooleanOptionalAction):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"{name}={raw!r}: expected true/false, 1/0, yes/no or on/off")
    if action.nargs == "+":
        return [_one(name, action, v.strip()) for v in value.split(_LIST_SEPARATOR)]
    return _one(name, action, value)


def _one(name: str, action: argparse.Action, value: str) -> Any:
    if not value:
        raise ValueError(f"{name} is set but empty")
    try:
        converted = action.type(value) if callable(action.type) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{name}={value!r}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(str, action.choices))}")
    return converted
