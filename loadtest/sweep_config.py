"""A sweep YAML as data: its configurations, rates, datasets and workload, with the command
line's overrides applied (`resolve`). No I/O beyond what the caller passes in."""

from __future__ import annotations

import argparse
import math
import os
import shlex
from dataclasses import dataclass, field, replace
from typing import Any

from loadtest.data import DATASET_NAMES
from loadtest.uniqueness import DEFAULT_PROMPT_UNIQUENESS, check_mode
from loadtest.workload import workload_defaults

DEFAULT_ENDPOINT = "/v1/completions"
# sequential: one configuration's server at a time, all its runs, then the next (each server
# holds memory only while it runs). interleaved: every server up at once and the runs of one
# rate back to back across configurations, so slow drift of a shared machine (another
# tenant, thermal state) falls on every configuration alike instead of on whichever ran
# during it.
SCHEDULES = ("sequential", "interleaved")


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def check_repeats(repeats: object) -> int:
    n = int(repeats)  # type: ignore[call-overload]
    if n < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    return n


@dataclass(frozen=True)
class Configuration:
    """One server setup to sweep. Exactly one of serve_args, command, base_url."""

    name: str
    serve_args: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    base_url: str | None = None
    model: str | None = None
    endpoint: str | None = None
    max_concurrency: int | None = None
    startup_timeout_s: float = 300.0
    # Extra environment for a started server (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU: "0").
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.serve_args, self.command, self.base_url)]
        if sum(given) != 1:
            raise ValueError(
                f"configuration {self.name!r}: give exactly one of serve_args (start specd), "
                "command (start another server, with {port}) or base_url (already running)"
            )


@dataclass(frozen=True)
class SweepConfig:
    name: str
    rates: tuple[float, ...]
    configurations: tuple[Configuration, ...]
    description: str = ""
    workload: dict[str, Any] = field(default_factory=dict)
    warmup_prompts: int = 2
    # Empty: the workload's single dataset_name. `resolve` always fills it in.
    datasets: tuple[str, ...] = ()
    prompt_uniqueness: str = DEFAULT_PROMPT_UNIQUENESS
    # Runs of every (configuration, dataset, rate); reports and bars take their median.
    repeats: int = 1
    schedule: str = "sequential"

    @property
    def multi_dataset(self) -> bool:
        return len(self.datasets) > 1


def parse_rate(x: Any) -> float:
    if isinstance(x, str) and x.strip().lower() in ("inf", "infinity"):
        return math.inf
    r = float(x)
    if not r > 0:
        raise ValueError(f"rates must be > 0 or 'inf', got {x!r}")
    return r


def _datasets(data: dict[str, Any]) -> tuple[str, ...]:
    raw = data.get("datasets")
    if raw is None:
        return ()
    if "dataset_name" in data:
        raise ValueError("give either 'datasets' (a list) or 'dataset_name', not both")
    names = (raw,) if isinstance(raw, str) else tuple(str(d) for d in raw)
    bad = [d for d in names if d not in DATASET_NAMES]
    if not names or bad:
        raise ValueError(f"'datasets' must list names from {DATASET_NAMES}, got {raw!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"'datasets' must not repeat a name: {list(names)}")
    return names


def _configuration(c: dict[str, Any]) -> Configuration:
    c = dict(c)
    for key in ("serve_args", "command"):
        if isinstance(c.get(key), str):
            c[key] = shlex.split(c[key])
        if c.get(key) is not None:
            c[key] = tuple(str(x) for x in c[key])
    c["env"] = {str(k): os.path.expandvars(str(v)) for k, v in (c.get("env") or {}).items()}
    try:
        return Configuration(**c)
    except TypeError as e:  # an unknown or missing key
        raise ValueError(f"configuration {c.get('name', '?')!r}: {e}") from e


def parse_sweep(data: dict[str, Any], fallback_name: str) -> SweepConfig:
    known = {
        "name",
        "description",
        "rates",
        "configurations",
        "warmup_prompts",
        "datasets",
        "prompt_uniqueness",
        "repeats",
        "schedule",
    }
    confs = [_configuration(c) for c in data.get("configurations") or []]
    if not confs:
        raise ValueError("a sweep YAML needs a non-empty 'configurations' list")
    names = [c.name for c in confs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    return SweepConfig(
        name=str(data.get("name", fallback_name)),
        rates=tuple(parse_rate(r) for r in data.get("rates") or ["inf"]),
        configurations=tuple(confs),
        description=str(data.get("description", "")),
        workload={k: v for k, v in data.items() if k not in known},
        warmup_prompts=int(data.get("warmup_prompts", 2)),
        datasets=_datasets(data),
        prompt_uniqueness=check_mode(str(data.get("prompt_uniqueness", DEFAULT_PROMPT_UNIQUENESS))),
        repeats=check_repeats(data.get("repeats", 1)),
        schedule=check_schedule(str(data.get("schedule", "sequential"))),
    )


def merge_workload(args: argparse.Namespace, workload: dict[str, Any]) -> argparse.Namespace:
    """Flags given on the command line, over the YAML's values, over the defaults. `args`
    holds a workload flag only when it was given (the sweep parser has no defaults for
    them, see `add_workload_args(given_only=True)`)."""
    defaults = workload_defaults()
    unknown = sorted(set(workload) - set(defaults))
    if unknown:
        raise ValueError(f"unknown sweep YAML key {unknown[0]!r}")
    merged = argparse.Namespace(**{**defaults, **workload, **vars(args)})
    return merged


def resolve(sweep: SweepConfig, args: argparse.Namespace) -> tuple[SweepConfig, argparse.Namespace]:
    """The sweep as it will run: `sweep` args (--rates, --only, --prompt-uniqueness,
    --repeats, --schedule, an explicit --dataset-name) applied over the YAML, and the merged
    workload flags."""
    wl = dict(sweep.workload)
    endpoint = wl.pop("endpoint", DEFAULT_ENDPOINT)
    dataset_flag_given = hasattr(args, "dataset_name")
    merged = merge_workload(args, wl)
    merged.endpoint = endpoint
    rates = tuple(parse_rate(r) for r in args.rates.split(",")) if args.rates else sweep.rates
    confs = sweep.configurations
    if args.only:
        only = args.only.split(",")
        unknown = sorted(set(only) - {c.name for c in confs})
        if unknown:
            raise ValueError(f"--only: no configuration named {unknown}")
        confs = tuple(c for c in confs if c.name in only)
    # An explicit --dataset-name narrows a multi-dataset sweep to that one dataset.
    if dataset_flag_given or not sweep.datasets:
        datasets: tuple[str, ...] = (merged.dataset_name,)
    else:
        datasets = sweep.datasets
    if len(datasets) > 1 and merged.dataset_path:
        raise ValueError("dataset_path replaces one dataset's prompts: use a single dataset")
    uniqueness = check_mode(args.prompt_uniqueness or sweep.prompt_uniqueness)
    repeats = getattr(args, "repeats", None)
    resolved = replace(
        sweep,
        rates=rates,
        configurations=confs,
        datasets=datasets,
        prompt_uniqueness=uniqueness,
        repeats=check_repeats(repeats) if repeats is not None else sweep.repeats,
        schedule=check_schedule(getattr(args, "schedule", None) or sweep.schedule),
    )
    return resolved, merged
