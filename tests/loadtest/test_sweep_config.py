"""Sweep YAML parsing: every shipped config loads, and bad ones fail with the fix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from loadtest.cli import build_parser
from loadtest.sweep import merge_workload, parse_sweep

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_parse(path: Path) -> None:
    sweep = parse_sweep(yaml.safe_load(path.read_text()), path.stem)
    assert sweep.configurations and sweep.rates
    args = build_parser().parse_args(["sweep", "--config", str(path)])
    wl = {k: v for k, v in sweep.workload.items() if k != "endpoint"}
    merge_workload(args, wl)  # every workload key is a known flag


def test_parse_and_merge() -> None:
    sweep = parse_sweep(
        {"rates": [1, "inf"], "num_prompts": 5, "configurations": [
            {"name": "a", "serve_args": "--model m --speculative-config '{\"method\": \"ngram\"}'"},
            {"name": "b", "base_url": "http://127.0.0.1:9"}]},
        "x",
    )  # fmt: skip
    assert sweep.rates == (1.0, math.inf)
    assert sweep.configurations[0].serve_args == (
        "--model", "m", "--speculative-config", '{"method": "ngram"}')  # fmt: skip
    args = build_parser().parse_args(["sweep", "--config", "x", "--seed", "3"])
    merged = merge_workload(args, {"num_prompts": 5, "seed": 9})
    assert merged.num_prompts == 5 and merged.seed == 3  # the explicit flag wins


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"configurations": []}, "non-empty"),
        ({"configurations": [{"name": "a"}]}, "exactly one of"),
        ({"configurations": [{"name": "a", "base_url": "u", "serve_args": []}]}, "exactly one"),
        (
            {"configurations": [{"name": "a", "base_url": "u"}, {"name": "a", "base_url": "v"}]},
            "unique",
        ),
        ({"rates": [0], "configurations": [{"name": "a", "base_url": "u"}]}, "rates"),
    ],
)
def test_bad_configs(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_sweep(data, "x")


def test_unknown_workload_key() -> None:
    args = build_parser().parse_args(["sweep", "--config", "x"])
    with pytest.raises(ValueError, match="unknown sweep YAML key"):
        merge_workload(args, {"num_prompt": 3})
