"""Where an engine step's time goes, no speculation against speculation policies, in process.

    python -m loadtest.bench_step_parts [--dataset free-form] [--batch 8]
        [--configs none goodput fixed:2 goodput@recycle/layered none#b] [--repeats 3]
        [--new-tokens 64] [--scenario repeat] [--served] [--out FILE.json]

Builds one engine per configuration (n-gram drafts, ``num_speculative_tokens`` 8 for the
cost-aware policies, k for ``fixed:k``) as ``bench_spec`` does, warms each on the same
unmeasured prompts, then runs one ``bench_spec`` cell (dataset x batch) ``--repeats`` times
per configuration in rotating order. Every part of every step is timed by wrapping the
engine's own methods: scheduling, the speculator's fill (the policy's allocate and select,
the shadow drafts; the rest of fill is proposing), the forward pass with verification
(execute; of it, the target's top-k that recycle and auto learn from), the scheduler's
update, and the speculator's observe (the cost model's and the acceptance estimator's
learning). Prints tokens/s per run, milliseconds per step per part,
and the decode steps by batch size (steps, seconds, tokens emitted): a closed batch's
makespan is its slowest request's step count, which speculation on the others cannot cut.

``--scenario repeat`` has each engine serve the cell's prompts once more, unmeasured, after
its warm-up, so the drafters that learn across requests (suffix, recycle's shared tables,
auto) know the answers: the state of a served sweep, where every rate sends the dataset's
prompts again, and acceptance is high (``fresh``, the default, starts from the warm-up alone).
``--served`` values tokens as a server does: an offline batch's requests are returned together
when the last is done, so the goodput policy prices a step's tokens by how they bring that
finish closer (``finish_together``); a server returns each request when it is done. With
the drafts each configuration verified and how many were accepted, per run.

Paired rounds and replicas: every round runs each configuration once, so each round's
tokens/s over the first configuration's (the reference) is a paired ratio; the results give
every round's ratio, their median and a 90% bootstrap interval of it. A ``#tag`` after a name
builds the same configuration again as another engine (``none none#b goodput goodput#b``).
Why: identical engines in one process differ by a few percent, run after run, and more rounds
do not average that out (on the mix at batch 8 on a 2-core CPU, three ``none`` engines' 8-row
decode steps took 49.4, 48.0 and 51.1 ms over the same eight rounds:
loadtest/results/spec/2026-12-06-step-parts-mix-b8-replicas.json). Replicas are pooled per
round (the geometric mean of their tokens/s) before the ratio, and each replica after a
group's first is compared with it, round by round: an A/A control that says how far apart
identical engines run here.

A measurement tool: run it alone on the machine (it times wall clock).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import server.model.runner as runner_module
from loadtest.bench_engine import machine_info
from loadtest.bench_spec import (
    DATASET_FILES,
    encode_chat,
    load_prompts,
    make_engine,
    method_options,
    restore_drafter,
    run_batch,
    warmup_prompts,
)
from loadtest.host import format_loadavg, loadavg
from loadtest.paired import median_interval
from server.config import SpeculativeConfig
from server.engine.offline import OfflineEngine
from server.model.loader import resolve_model
from server.spec_decode.drafter import TopTokenConsumer

_BATCH1_PROMPTS = 4
_WARMUP_TOKENS = 64


@dataclass
class DecodeStep:
    requests: int
    seconds: float
    tokens: int


@dataclass
class StepLog:
    """What one configuration's engine did, accumulated over its timed runs."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    steps: int = 0
    decode: list[DecodeStep] = field(default_factory=list)


def configuration(name: str) -> str:
    """The configuration a name builds: the name without its replica tag (``none#b``)."""
    return name.partition("#")[0]


def speculative_config(name: str) -> SpeculativeConfig:
    """``none``, a policy name (k <= 8) or ``fixed:k``, n-gram drafts unless ``@method`` follows
    (``goodput@recycle``; ``@recycle/layered`` also picks recycle's table scope); a ``#tag``
    names a replica (see the module docstring)."""
    name = configuration(name)
    if name == "none":
        return SpeculativeConfig()
    name, _, drafter = name.partition("@")
    method, extra = method_options(drafter or "ngram")
    policy, _, k = name.partition(":")
    budget = int(k) if k else 8
    return SpeculativeConfig(method=method, num_speculative_tokens=budget, policy=policy, **extra)  # type: ignore[arg-type]


def _timed(log: StepLog, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log.seconds[part] += time.perf_counter() - start

    return wrapper


def instrument_drafter(engine: OfflineEngine, log: StepLog) -> None:
    """Times the drafter's learning from each step's top-k (recycle, auto). Called after every
    ``restore_drafter``: the restored drafter is a fresh copy."""
    drafter = engine.core.drafter
    if isinstance(drafter, TopTokenConsumer):
        observe = _timed(log, "drafter: observe top tokens", drafter.observe_top_tokens)
        drafter.observe_top_tokens = observe  # type: ignore[method-assign]


# The log of the engine whose forward pass is running: the runner's top-k feed is a module
# function that all engines share, so its time goes to the engine executing.
_executing: list[StepLog] = []


def _instrument_top_tokens() -> None:
    """Times the runner's top-k feed for recycle and auto ("execute: top tokens"), once."""
    if getattr(runner_module.top_tokens, "timed", False):
        return
    top_tokens = runner_module.top_tokens

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return top_tokens(*args, **kwargs)
        finally:
            if _executing:
                _executing[-1].seconds["execute: top tokens"] += time.perf_counter() - start

    timed.timed = True  # type: ignore[attr-defined]
    runner_module.top_tokens = timed  # type: ignore[assignment]


def instrument(engine: OfflineEngine, log: StepLog) -> None:
    """Times each part of the engine's steps into ``log`` (see the module docstring)."""
    _instrument_top_tokens()
    core = engine.core
    core.scheduler.schedule = _timed(log, "schedule", core.scheduler.schedule)  # type: ignore[method-assign]
    core.scheduler.update = _timed(log, "update", core.scheduler.update)  # type: ignore[method-assign]
    execute = core.runner.execute

    def timed_execute(plan: Any) -> Any:
        start = time.perf_counter()
        _executing.append(log)
        try:
            out = execute(plan)
        finally:
            _executing.pop()
        seconds = time.perf_counter() - start
        log.seconds["execute"] += seconds
        if all(plan.num_scheduled_tokens[r.request_id] == 1 for r in plan.requests):
            tokens = sum(len(t) for t in out.sampled_token_ids.values())
            log.decode.append(DecodeStep(len(plan.requests), seconds, tokens))
        return out

    core.runner.execute = timed_execute  # type: ignore[method-assign]
    step = core.step

    def timed_step() -> Any:
        log.steps += 1
        return _timed(log, "step", step)()

    core.step = timed_step  # type: ignore[method-assign]
    speculator = core.speculator
    if speculator is None:
        return
    speculator.fill = _timed(log, "fill", speculator.fill)  # type: ignore[method-assign]
    speculator.observe = _timed(log, "observe", speculator.observe)  # type: ignore[method-assign]
    speculator._shadow_drafts = _timed(log, "fill: shadow drafts", speculator._shadow_drafts)  # type: ignore[method-assign]
    policy = speculator.policy
    policy.allocate = _timed(log, "fill: allocate", policy.allocate)  # type: ignore[method-assign]
    policy.select = _timed(log, "fill: select", policy.select)  # type: ignore[method-assign]
    cost = getattr(policy, "cost", None)
    if cost is not None:
        cost.observe = _timed(log, "observe: cost model", cost.observe)
    estimator = getattr(policy, "estimator", None)
    if estimator is not None:
        estimator.observe = _timed(log, "observe: estimator", estimator.observe)


def per_step_ms(log: StepLog) -> dict[str, float]:
    """Milliseconds per engine step, per part."""
    return {part: 1e3 * s / max(log.steps, 1) for part, s in sorted(log.seconds.items())}


def decode_by_batch(log: StepLog) -> dict[int, dict[str, float]]:
    """Pure decode steps grouped by batch size: steps, seconds, tokens emitted."""
    out: dict[int, dict[str, float]] = {}
    for d in log.decode:
        row = out.setdefault(d.requests, {"steps": 0, "seconds": 0.0, "tokens": 0})
        row["steps"] += 1
        row["seconds"] += d.seconds
        row["tokens"] += d.tokens
    return dict(sorted(out.items()))


def paired_rounds(speeds: dict[str, list[float]]) -> dict[str, Any]:
    """Round-by-round ratios of tokens/s (see the module docstring). ``over_reference``: per
    configuration after the first, its replicas pooled (geometric mean) over the first
    configuration's, likewise pooled; ``controls``: per replica after its configuration's
    first, over that first. Each: the ratios, their median, a 90% bootstrap interval."""
    replicas: dict[str, list[str]] = {}
    for name in speeds:
        replicas.setdefault(configuration(name), []).append(name)
    rounds = min(len(runs) for runs in speeds.values())
    pooled = {
        config: [
            math.exp(statistics.fmean(math.log(speeds[name][r]) for name in names))
            for r in range(rounds)
        ]
        for config, names in replicas.items()
    }
    reference = next(iter(replicas))
    return {
        "reference": reference,
        "replicas": replicas,
        "over_reference": {
            config: _ratios(pooled[config], pooled[reference])
            for config in replicas
            if config != reference
        },
        "controls": {
            name: _ratios(speeds[name][:rounds], speeds[names[0]][:rounds])
            for names in replicas.values()
            for name in names[1:]
        },
    }


def _ratios(values: list[float], base: list[float]) -> dict[str, Any]:
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    interval = median_interval(ratios)
    return {
        "ratios": [round(x, 4) for x in ratios],
        "median": round(interval.median, 4),
        "low": round(interval.low, 4),
        "high": round(interval.high, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="free-form", choices=list(DATASET_FILES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--configs", nargs="+", default=["none", "goodput"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--scenario", default="fresh", choices=["fresh", "repeat"])
    ap.add_argument("--served", action="store_true", help="no finish-together valuing")
    ap.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = ap.parse_args(argv)
    if len(set(args.configs)) < len(args.configs):
        ap.error("name each configuration once; a #tag builds another engine of it: none none#b")

    model_dir = resolve_model(args.model)
    print(f"building {len(args.configs)} engines (load average {format_loadavg(loadavg())})")
    engines: dict[str, OfflineEngine] = {}
    saved: dict[str, object] = {}
    logs: dict[str, StepLog] = {}
    warmup: list[list[int]] = []
    prompts: list[list[int]] = []
    n = _BATCH1_PROMPTS if args.batch == 1 else args.batch
    for name in args.configs:
        engine = engines[name] = make_engine(model_dir, speculative_config(name))
        if args.served and engine.core.speculator is not None:
            engine.core.speculator.finish_together = False
        warmup = warmup or encode_chat(engine, warmup_prompts())
        prompts = prompts or encode_chat(engine, load_prompts(DATASET_FILES[args.dataset], n))
        run_batch(engine, warmup, 8, _WARMUP_TOKENS)
        if args.scenario == "repeat":
            run_batch(engine, prompts, args.batch, args.new_tokens)
        saved[name] = copy.deepcopy(engine.core.drafter)
        instrument(engine, logs.setdefault(name, StepLog()))
        print(f"  {name}: ready", flush=True)
    load = loadavg()
    speeds: dict[str, list[float]] = {name: [] for name in args.configs}
    drafted: dict[str, list[tuple[int, int, int]]] = {name: [] for name in args.configs}
    for rep in range(args.repeats):
        shift = rep % len(args.configs)
        for name in args.configs[shift:] + args.configs[:shift]:
            restore_drafter(engines[name], saved[name])
            instrument_drafter(engines[name], logs[name])
            before = engines[name].core.stats()
            outputs, seconds = run_batch(engines[name], prompts, args.batch, args.new_tokens)
            speeds[name].append(sum(len(o) for o in outputs) / seconds)
            after = engines[name].core.stats()
            drafted[name].append(
                (
                    after.num_drafts - before.num_drafts,
                    after.num_draft_tokens - before.num_draft_tokens,
                    after.num_accepted_tokens - before.num_accepted_tokens,
                )
            )
    results = {
        "command": " ".join(["python -m loadtest.bench_step_parts", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "scenario": args.scenario,
        "served": args.served,
        "load_average_before": list(load) if load else [],
        "load_average_after": list(loadavg() or []),
        "configs": {
            name: {
                "tokens_per_s": [round(s, 2) for s in speeds[name]],
                "median_tokens_per_s": round(statistics.median(speeds[name]), 2),
                "steps": logs[name].steps,
                # Per run: verified drafts (trees), draft tokens, accepted tokens.
                "drafts_tokens_accepted": drafted[name],
                "ms_per_step": {k: round(v, 3) for k, v in per_step_ms(logs[name]).items()},
                "decode_by_batch": decode_by_batch(logs[name]),
            }
            for name in args.configs
        },
        "paired": paired_rounds(speeds),
    }
    print_results(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def print_results(results: dict[str, Any]) -> None:
    before, after = results["load_average_before"], results["load_average_after"]
    print(f"load average before {before}, after {after}")
    for name, r in results["configs"].items():
        speed = f"{r['median_tokens_per_s']} tok/s (runs {r['tokens_per_s']})"
        print(f"{name}: {speed}, {r['steps']} steps")
        runs = r.get("drafts_tokens_accepted", [])
        if any(d for d, _, _ in runs):
            drafts, tokens, accepted = (sum(x) for x in zip(*runs, strict=True))
            print(
                f"    {drafts} drafts verified, {tokens} draft tokens, {accepted} accepted "
                f"({accepted / max(drafts, 1):.2f} a draft)"
            )
        for part, ms in r["ms_per_step"].items():
            print(f"    {part:24s} {ms:8.3f} ms/step")
        print("    decode steps by batch size: steps, seconds, tokens")
        for batch, row in r["decode_by_batch"].items():
            print(f"      {batch:3d}: {row['steps']:4d} {row['seconds']:7.2f} s {row['tokens']:6d}")
    paired = results.get("paired")
    if paired:
        print_paired(paired)


def print_paired(paired: dict[str, Any]) -> None:
    def line(label: str, r: dict[str, Any]) -> str:
        rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
        return f"  {label:28s} {r['median']:.3f} [{r['low']:.3f}, {r['high']:.3f}]  {rounds}"

    replicas = paired["replicas"]
    reference = paired["reference"]
    print(
        f"tokens/s over {reference}'s ({len(replicas[reference])} engine(s) pooled), round by "
        "round: median [90% interval], rounds"
    )
    for config, r in paired["over_reference"].items():
        print(line(f"{config} ({len(replicas[config])} engine(s))", r))
    if paired["controls"]:
        print("A/A control, a replica over its configuration's first engine:")
        for name, r in paired["controls"].items():
            print(line(name, r))


if __name__ == "__main__":
    raise SystemExit(main())
