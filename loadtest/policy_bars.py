"""Did the goodput policy clear its bars in a policy sweep? (issue: the headline sweep)

    python -m loadtest.policy_bars loadtest/reports/<date>-spec-policies \\
        [--policy goodput] [--baseline no-spec] [--lowest-rate-speedup repetitive=1.5 mix=1.2]
        [--among no-spec ngram-k2 ngram-k4 ngram-k8 smartspec-uniform goodput] [--out bars.md]

``--among`` limits "the others" to the named configurations (the headline sweep compares
policies over one drafter, then drafters under one policy:
``--policy auto-goodput --among goodput recycle-goodput suffix-goodput no-spec
--lowest-rate-speedup --out bars-drafters.md``).

Reads the sweep's ``sweep.json`` and checks, per dataset, on mean end-to-end latency:

- at every rate, ``--policy`` is at most ``--vs-best`` (1.05) x the best other configuration;
- at the lowest rate, it is at least the dataset's ``--lowest-rate-speedup`` x faster than
  ``--baseline`` (no speculation);
- at no rate is it more than ``--vs-baseline`` (1.03) x the baseline.

Writes ``bars.md`` (or ``--out``) beside the report and prints it. Exit status 0 either way:
a bar that is missed is a finding to report, not a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.repeats import format_rate, group_by_rate, median_run

DEFAULT_LOWEST_RATE_SPEEDUP = {"repetitive": 1.5, "mix": 1.2}


@dataclass(frozen=True)
class Bars:
    policy: str = "goodput"
    baseline: str = "no-spec"
    vs_best: float = 1.05
    vs_baseline: float = 1.03
    lowest_rate_speedup: tuple[tuple[str, float], ...] = tuple(DEFAULT_LOWEST_RATE_SPEEDUP.items())
    # The configurations the policy is compared with (None: every other one in the sweep).
    among: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RateCheck:
    dataset: str
    rate: float
    policy_ms: float
    best_other: str
    best_other_ms: float
    baseline_ms: float
    # Runs behind each number (a sweep with repeats: every number is their median).
    runs: int = 1

    @property
    def vs_best(self) -> float:
        return self.policy_ms / self.best_other_ms

    @property
    def vs_baseline(self) -> float:
        return self.policy_ms / self.baseline_ms


def rate_checks(summary: dict[str, dict[str, list[dict[str, Any]]]], bars: Bars) -> list[RateCheck]:
    """One check per (dataset, rate) where the policy, the baseline and another ran; with
    repeated runs, on each configuration's median over its runs at that rate."""
    out = []
    for dataset, configs in summary.items():
        by_rate: dict[float, dict[str, float]] = {}
        counts: dict[float, list[int]] = {}
        for name, runs in configs.items():
            done = [r for r in runs if r.get("completed") and r.get("mean_e2el_ms") is not None]
            for rate, group in group_by_rate(done).items():
                by_rate.setdefault(rate, {})[name] = median_run(group)["mean_e2el_ms"]
                counts.setdefault(rate, []).append(len(group))
        for rate in sorted(by_rate):
            row = by_rate[rate]
            others = {
                n: ms
                for n, ms in row.items()
                if n != bars.policy and (bars.among is None or n in bars.among)
            }
            if bars.policy not in row or bars.baseline not in row or not others:
                continue
            best = min(others, key=others.__getitem__)
            out.append(
                RateCheck(
                    dataset,
                    rate,
                    row[bars.policy],
                    best,
                    others[best],
                    row[bars.baseline],
                    min(counts[rate]),
                )
            )
    return out


def missed_bars(check: RateCheck, bars: Bars, lowest_rate: bool) -> list[str]:
    """What this (dataset, rate) misses; ``lowest_rate``: the dataset's lowest rate."""
    fails = []
    if check.vs_best > bars.vs_best:
        fails.append(f"{_beside(check.vs_best, bars.vs_best)}x the best other ({check.best_other})")
    if check.vs_baseline > bars.vs_baseline:
        fails.append(f"{_beside(check.vs_baseline, bars.vs_baseline)}x {bars.baseline}")
    need = dict(bars.lowest_rate_speedup).get(check.dataset)
    if lowest_rate and need is not None and 1 / check.vs_baseline < need:
        fails.append(f"lowest-rate speed-up {_beside(1 / check.vs_baseline, need)}x < {need}x")
    return fails


def _beside(value: float, bar: float) -> str:
    """``value`` to 2 decimals, or to 3 where 2 would read as the bar it missed (1.198 is
    not '1.20x < 1.2x')."""
    return f"{value:.3f}" if round(value, 2) == round(bar, 2) else f"{value:.2f}"


def markdown(checks: list[RateCheck], bars: Bars, source: str) -> str:
    speedups = dict(bars.lowest_rate_speedup)
    lines = [
        f"# Bars for `{bars.policy}` in {source}",
        "",
        f"Mean E2E latency. Bars: at every rate <= {bars.vs_best}x the best other "
        f"configuration and <= {bars.vs_baseline}x `{bars.baseline}`; at the lowest rate "
        + ", ".join(f"{s}x faster than `{bars.baseline}` on `{d}`" for d, s in speedups.items())
        + "."
        + _runs_note(checks),
        "",
        f"| dataset | rate | {bars.policy} ms | best other | its ms | vs best | "
        f"{bars.baseline} ms | vs {bars.baseline} | speed-up over {bars.baseline} | passes |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    missed = []
    lowest: dict[str, float] = {}
    for c in checks:  # in rate order per dataset
        lowest.setdefault(c.dataset, c.rate)
    for c in checks:
        fails = missed_bars(c, bars, lowest_rate=c.rate == lowest[c.dataset])
        missed += [f"- {c.dataset} @ {format_rate(c.rate)}: {f}" for f in fails]
        lines.append(
            f"| {c.dataset} | {format_rate(c.rate)} | {c.policy_ms:.0f} | {c.best_other} | "
            f"{c.best_other_ms:.0f} | {c.vs_best:.2f}x | {c.baseline_ms:.0f} | "
            f"{c.vs_baseline:.2f}x | {1 / c.vs_baseline:.2f}x | {'NO' if fails else 'yes'} |"
        )
    lines += ["", "Missed:" if missed else "Every bar holds.", "", *missed, ""]
    return "\n".join(lines)


def _runs_note(checks: list[RateCheck]) -> str:
    most = max((c.runs for c in checks), default=1)
    if most == 1:
        return ""
    least = min(c.runs for c in checks)
    runs = f"{least}" if least == most else f"{least}-{most}"
    return f" Every latency is the median of {runs} runs of its cell."


def _speedup(text: str) -> tuple[str, float]:
    dataset, _, value = text.partition("=")
    return dataset, float(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.policy_bars", description=__doc__)
    p.add_argument("report_dir", type=Path)
    p.add_argument("--policy", default=Bars.policy)
    p.add_argument("--baseline", default=Bars.baseline)
    p.add_argument("--vs-best", type=float, default=Bars.vs_best)
    p.add_argument("--vs-baseline", type=float, default=Bars.vs_baseline)
    p.add_argument(
        "--lowest-rate-speedup",
        nargs="*",
        type=_speedup,
        default=list(DEFAULT_LOWEST_RATE_SPEEDUP.items()),
        metavar="DATASET=X",
    )
    p.add_argument("--among", nargs="+", help="compare with these configurations only")
    p.add_argument("--out", default="bars.md", help="file name, beside the report")
    args = p.parse_args(argv)
    bars = Bars(
        args.policy,
        args.baseline,
        args.vs_best,
        args.vs_baseline,
        tuple(args.lowest_rate_speedup),
        tuple(args.among) if args.among else None,
    )
    summary = json.loads((args.report_dir / "sweep.json").read_text())["summary"]
    checks = rate_checks(summary, bars)
    if not checks:
        # "Every bar holds" over no rows would read as a pass.
        print(
            f"no rate in {args.report_dir} has {bars.policy}, {bars.baseline} and another "
            "configuration to check",
            file=sys.stderr,
        )
        return 1
    text = markdown(checks, bars, f"`{args.report_dir}`")
    (args.report_dir / args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
