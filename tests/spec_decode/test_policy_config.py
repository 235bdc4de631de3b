"""Choosing a policy by name from the command line and from the YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args
from server.config import SpecdConfig


def parse(*argv: str) -> SpecdConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_goodput_is_the_default_and_policies_are_chosen_by_name() -> None:
    cfg = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 8}')
    assert cfg.engine.speculative.policy == "goodput" and cfg.engine.speculative.enabled
    for name in ("smartspec_uniform", "fixed", "none"):
        spec = f'{{"method": "ngram", "num_speculative_tokens": 4, "policy": "{name}"}}'
        assert parse("--speculative-config", spec).engine.speculative.policy == name
    assert not parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, '
                     '"policy": "none"}').engine.speculative.enabled  # fmt: skip


def test_unknown_policy_is_refused_before_the_model_loads() -> None:
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "policy": "greedy-ish"}'
    with pytest.raises(ValueError, match=r"unknown speculation policy 'greedy-ish'.*goodput"):
        parse("--speculative-config", spec)


def test_policy_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "engine:\n  speculative:\n    method: tree\n    num_speculative_tokens: 8\n"
        "    policy: smartspec_uniform\n    cost_profile_seconds: 2\n"
    )
    cfg = parse("--config", str(path))
    assert cfg.engine.speculative.policy == "smartspec_uniform"
    assert cfg.engine.speculative.cost_profile_seconds == 2
    path.write_text("engine:\n  speculative:\n    method: tree\n    policy: nope\n")
    with pytest.raises(ValueError):
        parse("--config", str(path))
