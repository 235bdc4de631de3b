"""Sweep YAML parsing: every shipped config loads, bad ones fail with the fix, and the
command line's overrides (rates, configurations, datasets, prompt uniqueness) apply."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from loadtest.cli import build_parser
from loadtest.sweep_config import merge_workload, parse_sweep, resolve

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
SWEEPS = sorted(SWEEPS_DIR.glob("*.yaml"))
CONFS = [{"name": "a", "base_url": "http://127.0.0.1:9"}, {"name": "b", "base_url": "u"}]


def _args(*flags: str):
    return build_parser().parse_args(["sweep", "--config", "x", *flags])


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_parse(path: Path) -> None:
    sweep = parse_sweep(yaml.safe_load(path.read_text()), path.stem)
    assert sweep.configurations and sweep.rates
    resolved, _ = resolve(sweep, _args())  # every workload key is a known flag
    assert resolved.datasets


def test_headline_sweep_is_the_policy_comparison() -> None:
    data = yaml.safe_load((SWEEPS_DIR / "spec-policies.yaml").read_text())
    sweep, args = resolve(parse_sweep(data, "spec-policies"), _args())
    assert sweep.datasets == ("mix", "repetitive")
    assert sweep.prompt_uniqueness == "per_rate_prefix"
    assert args.burstiness == 1.0  # Poisson arrivals
    assert args.num_prompts >= 32 and len(sweep.rates) >= 5 and math.inf in sweep.rates
    assert list(sweep.rates) == sorted(sweep.rates)
    spec = {}
    for c in sweep.configurations:
        args_ = list(c.serve_args or ())
        flag = "--speculative-config"
        spec[c.name] = json.loads(args_[args_.index(flag) + 1]) if flag in args_ else None
    assert spec["no-spec"] is None
    for k in (2, 4, 8):
        assert spec[f"ngram-k{k}"] == {"method": "ngram", "num_speculative_tokens": k,
                                       "policy": "fixed"}  # fmt: skip
    assert spec["smartspec-uniform"]["policy"] == "smartspec_uniform"
    assert spec["goodput"]["policy"] == "goodput"
    assert spec["smartspec-uniform"]["num_speculative_tokens"] == 8
    assert spec["goodput"]["num_speculative_tokens"] == 8
    # The drafters under the goodput policy (issue 12), ngram's being "goodput".
    for method in ("recycle", "suffix", "auto"):
        assert spec[f"{method}-goodput"] == {"method": method, "num_speculative_tokens": 8,
                                             "policy": "goodput"}  # fmt: skip
    assert len(spec) == 9


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
    merged = merge_workload(_args("--seed", "3"), {"num_prompts": 5, "seed": 9})
    assert merged.num_prompts == 5 and merged.seed == 3  # the explicit flag wins


def test_datasets_and_uniqueness_from_yaml() -> None:
    data = {"datasets": ["mix", "repetitive"], "prompt_uniqueness": "none", "configurations": CONFS}
    sweep, args = resolve(parse_sweep(data, "x"), _args())
    assert sweep.datasets == ("mix", "repetitive") and sweep.multi_dataset
    assert sweep.prompt_uniqueness == "none"
    assert args.endpoint == "/v1/completions"


def test_single_dataset_name_still_works_and_uniqueness_defaults_on() -> None:
    sweep, args = resolve(parse_sweep({"dataset_name": "chat", "configurations": CONFS}, "x"),
                          _args())  # fmt: skip
    assert sweep.datasets == ("chat",) and not sweep.multi_dataset
    assert args.dataset_name == "chat"
    assert sweep.prompt_uniqueness == "per_rate_prefix"


def test_command_line_overrides() -> None:
    data = {"datasets": ["mix", "repetitive"], "rates": [1, 2], "configurations": CONFS}
    sweep, _ = resolve(
        parse_sweep(data, "x"),
        _args("--dataset-name", "chat", "--rates", "3,inf", "--only", "b",
              "--prompt-uniqueness", "none"),
    )  # fmt: skip
    assert sweep.datasets == ("chat",)  # an explicit --dataset-name narrows to one dataset
    assert sweep.rates == (3.0, math.inf)
    assert [c.name for c in sweep.configurations] == ["b"]
    assert sweep.prompt_uniqueness == "none"
    with pytest.raises(ValueError, match="--only"):
        resolve(parse_sweep(data, "x"), _args("--only", "nope"))


def test_repeats_and_schedule_from_yaml_and_flags() -> None:
    plain = parse_sweep({"configurations": CONFS}, "x")
    assert (plain.repeats, plain.schedule) == (1, "sequential")
    data = {"repeats": 3, "schedule": "interleaved", "configurations": CONFS}
    sweep, _ = resolve(parse_sweep(data, "x"), _args())
    assert (sweep.repeats, sweep.schedule) == (3, "interleaved")
    sweep, _ = resolve(parse_sweep(data, "x"), _args("--repeats", "5", "--schedule", "sequential"))
    assert (sweep.repeats, sweep.schedule) == (5, "sequential")
    with pytest.raises(ValueError, match="repeats"):
        resolve(parse_sweep(data, "x"), _args("--repeats", "0"))


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
        ({"rates": [0], "configurations": CONFS}, "rates"),
        ({"datasets": ["mix", "nope"], "configurations": CONFS}, "datasets"),
        ({"datasets": [], "configurations": CONFS}, "datasets"),
        ({"datasets": ["mix", "mix"], "configurations": CONFS}, "repeat"),
        ({"datasets": ["mix"], "dataset_name": "chat", "configurations": CONFS}, "not both"),
        ({"prompt_uniqueness": "sometimes", "configurations": CONFS}, "prompt_uniqueness"),
        ({"repeats": 0, "configurations": CONFS}, "repeats"),
        ({"schedule": "shuffled", "configurations": CONFS}, "schedule"),
    ],
)
def test_bad_configs(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_sweep(data, "x")


def test_dataset_path_needs_a_single_dataset() -> None:
    data = {"datasets": ["mix", "chat"], "dataset_path": "/tmp/x.jsonl", "configurations": CONFS}
    with pytest.raises(ValueError, match="single dataset"):
        resolve(parse_sweep(data, "x"), _args())


def test_unknown_workload_key() -> None:
    with pytest.raises(ValueError, match="unknown sweep YAML key"):
        merge_workload(_args(), {"num_prompt": 3})
    with pytest.raises(ValueError, match="unknown sweep YAML key"):
        merge_workload(_args(), {"output_dir": "/tmp"})  # a sweep flag, not a workload key


def test_a_flag_given_with_its_default_value_still_wins() -> None:
    """`--dataset-name mix` (the flag's default) narrowed nothing when "given" meant "differs
    from the default"; the 2026-12-02 headline sweep ran both datasets because of it."""
    data = {"datasets": ["mix", "repetitive"], "seed": 7, "configurations": CONFS}
    sweep, args = resolve(parse_sweep(data, "x"), _args("--dataset-name", "mix", "--seed", "0"))
    assert sweep.datasets == ("mix",)
    assert args.seed == 0  # 0 is --seed's default, given explicitly: it beats the YAML's 7
    _, args = resolve(parse_sweep(data, "x"), _args())
    assert args.seed == 7 and args.num_prompts == 100  # YAML, then the flag's default
