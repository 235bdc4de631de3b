"""Is one configuration slower than another, beyond what two identical servers differ by?

    python -m loadtest.paired <report dir> [<report dir> ...] --policy auto-goodput
        --baseline suffix-a [suffix-goodput] [--control suffix-b] [--tolerance 1.05]
        [--metric mean_e2el_ms] [--out paired.md]

A sweep with the interleaved schedule runs each (dataset, rate, repeat) as one round over all
its servers, back to back, so the runs of a round met the same machine. This pairs them: per
round, the policy's number over the baseline's. A cell's medians (``loadtest.policy_bars``)
throw the pairing away, and on a shared 2-core machine the rounds differ by more than the
configurations do.

``--control`` names a second server identical to the baseline (an A/A control, e.g.
configs/sweeps/auto-vs-suffix-aa.yaml): its ratios to the baseline are pure noise, and they
show how far a ratio can stray with nothing changed. Measured
(loadtest/reports/2026-12-06-auto-vs-suffix-aa-mix-3-runs): two identical suffix-goodput
servers, three rounds a rate, medians 0.89x, 0.90x, 1.04x, 1.07x and 0.96x from 0.25 req/s to
all at once, single rounds from 0.77x to 1.12x.

Per (dataset, rate): the pairs, their median and a 90% bootstrap interval of the median
(resampling pairs; with three pairs it is close to their range), the same for the control,
and a verdict on the policy:

- ``no worse``: median ratio <= ``--tolerance``;
- ``slower``: median above the tolerance and the interval's low end above the control's
  high end (or, without a control, above 1): the runs bear it out;
- ``within noise``: median above the tolerance, but the control strays as far.

Several report dirs pool their pairs (each report's names may differ: ``--baseline`` and
``--control`` take several names, the first one a report has is used). Writes ``paired.md``
and ``paired.png`` (every pair's ratio by rate) into the first report dir and prints the
table. Exit status 0 either way: a verdict is a finding, not a crash.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.repeats import format_rate, rate_key

Run = dict[str, Any]
# (dataset, rate) -> rounds' ratios, in report order.
Ratios = dict[tuple[str, float], list[float]]

_BOOTSTRAP_SAMPLES = 2000
_INTERVAL = 0.90


@dataclass(frozen=True)
class Interval:
    median: float
    low: float
    high: float


@dataclass(frozen=True)
class Cell:
    dataset: str
    rate: float
    policy: list[float]
    control: list[float]

    def verdict(self, tolerance: float) -> str:
        ours = median_interval(self.policy)
        if ours.median <= tolerance:
            return "no worse"
        noise_high = median_interval(self.control).high if self.control else 1.0
        return "slower" if ours.low > noise_high else "within noise"


def first_present(names: Sequence[str], configs: dict[str, Any]) -> str | None:
    return next((n for n in names if n in configs), None)


def paired_ratios(
    configs: dict[str, list[Run]], policy: str, baseline: str, metric: str
) -> dict[float, list[float]]:
    """Per rate, ``policy``'s ``metric`` over ``baseline``'s, round by round (one dataset's
    runs, paired by their repeat index); a round either configuration missed is left out."""
    out: dict[float, list[float]] = {}
    if policy not in configs or baseline not in configs:
        return out
    base = _by_round(configs[baseline], metric)
    for key, value in _by_round(configs[policy], metric).items():
        if key in base and base[key] > 0:
            out.setdefault(key[0], []).append(value / base[key])
    return out


def _by_round(runs: list[Run], metric: str) -> dict[tuple[float, int], float]:
    """(rate, repeat) -> the run's number; a run without a repeat index is its rate's n-th."""
    out = {}
    seen: dict[float, int] = {}
    for run in runs:
        rate = rate_key(run)
        nth = seen[rate] = seen.get(rate, -1) + 1
        value = run.get(metric)
        if run.get("completed") and isinstance(value, (int, float)) and math.isfinite(value):
            out[(rate, int(run.get("repeat", nth)))] = float(value)
    return out


def median_interval(ratios: Sequence[float], seed: int = 0) -> Interval:
    """The median and a bootstrap interval of it (``_INTERVAL``, resampling the pairs)."""
    values = np.asarray(ratios, float)
    if values.size == 1:
        return Interval(float(values[0]), float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    samples = np.median(rng.choice(values, (_BOOTSTRAP_SAMPLES, values.size)), axis=1)
    tail = (1 - _INTERVAL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(np.median(values)), float(low), float(high))


def cells(
    reports: list[dict[str, Any]],
    policy: str,
    baselines: Sequence[str],
    controls: Sequence[str],
    metric: str,
) -> list[Cell]:
    """The pairs of every report, pooled per (dataset, rate)."""
    ours: Ratios = {}
    noise: Ratios = {}
    for summary in reports:
        for dataset, configs in summary.items():
            baseline = first_present(baselines, configs)
            if baseline is None:
                continue
            for rate, r in paired_ratios(configs, policy, baseline, metric).items():
                ours.setdefault((dataset, rate), []).extend(r)
            control = first_present(controls, configs)
            if control is not None:
                for rate, r in paired_ratios(configs, control, baseline, metric).items():
                    noise.setdefault((dataset, rate), []).extend(r)
    return [Cell(d, rate, ours[(d, rate)], noise.get((d, rate), [])) for d, rate in sorted(ours)]


def _fmt(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    i = median_interval(ratios)
    return f"{i.median:.3f} ({i.low:.2f}-{i.high:.2f}, n={len(ratios)})"


def markdown(found: list[Cell], args: argparse.Namespace) -> str:
    sources = ", ".join(f"`{d}`" for d in args.report_dirs)
    lines = [
        f"# `{args.policy}` against `{' / '.join(args.baseline)}`, run by run",
        "",
        f"From {sources}: per interleaved round, `{args.metric}` of `{args.policy}` over the "
        "baseline's (below 1: faster). Median of the rounds' ratios and a 90% bootstrap "
        "interval of it; the control is a server identical to the baseline, so its ratios are "
        f"the machine's noise. Tolerance {args.tolerance:g}.",
        "",
        "| dataset | rate | policy / baseline | control / baseline | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in found:
        lines.append(
            f"| {c.dataset} | {format_rate(c.rate)} | {_fmt(c.policy)} | {_fmt(c.control)} "
            f"| {c.verdict(args.tolerance)} |"
        )
    lines += ["", "Every pair (policy, then control), by rate:", ""]
    for c in found:
        pairs = " ".join(f"{r:.2f}" for r in c.policy)
        noise = " ".join(f"{r:.2f}" for r in c.control) or "-"
        lines.append(f"- {c.dataset} @ {format_rate(c.rate)}: {pairs}; control {noise}")
    return "\n".join(lines) + "\n"


def plot(found: list[Cell], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c.dataset for c in found})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [c for c in found if c.dataset == dataset]
        for x, c in enumerate(mine):
            for offset, ratios, color, label in (
                (-0.12, c.policy, "tab:blue", args.policy),
                (0.12, c.control, "tab:gray", f"control ({' / '.join(args.control)})"),
            ):
                if not ratios:
                    continue
                ax.scatter(
                    [x + offset] * len(ratios),
                    ratios,
                    color=color,
                    alpha=0.6,
                    s=18,
                    label=label if x == 0 else None,
                )
                ax.hlines(
                    statistics.median(ratios), x + offset - 0.1, x + offset + 0.1, color=color
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(
            args.tolerance,
            color="tab:red",
            linewidth=0.8,
            linestyle="--",
            label=f"tolerance {args.tolerance:g}",
        )
        ax.set_xticks(range(len(mine)), [format_rate(c.rate) for c in mine])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{args.metric}: over {' / '.join(args.baseline)}")
        ax.set_title(f"{dataset}: paired runs (bar: median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("report_dirs", type=Path, nargs="+")
    p.add_argument("--policy", required=True)
    p.add_argument(
        "--baseline", nargs="+", required=True, help="names; each report uses the first it has"
    )
    p.add_argument("--control", nargs="+", default=[], help="a server identical to the baseline")
    p.add_argument("--tolerance", type=float, default=1.05)
    p.add_argument("--metric", default="mean_e2el_ms")
    p.add_argument("--out", default="paired.md", help="file name, in the first report dir")
    args = p.parse_args(argv)
    reports = [json.loads((d / "sweep.json").read_text())["summary"] for d in args.report_dirs]
    found = cells(reports, args.policy, args.baseline, args.control, args.metric)
    if not found:
        print(
            f"no paired runs of {args.policy} and {args.baseline} in {args.report_dirs}",
            file=sys.stderr,
        )
        return 1
    text = markdown(found, args)
    out = args.report_dirs[0] / args.out
    out.write_text(text)
    plot(found, args, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
