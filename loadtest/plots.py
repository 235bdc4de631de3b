"""The report's PNGs (matplotlib, Agg), one set per dataset of a sweep.

Against rate (categorical x axis, "inf" included): latency and throughput, one colour per
configuration. Over time (x = seconds since each run's start, one column per rate): draft
acceptance and specd's policy series, from the /metrics samples of each run's
`metrics_timeline`; a configuration without them draws nothing, and a figure with nothing to
draw is not written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg")

Results = dict[str, list[dict[str, Any]]]  # configuration -> result JSON per rate


def _rate_label(r: Any) -> str:
    return "inf" if r == "inf" else f"{float(r):g}"


def _xs(results: Results) -> list[str]:
    labels: list[str] = []
    for runs in results.values():
        for run in runs:
            if (lab := _rate_label(run["request_rate"])) not in labels:
                labels.append(lab)
    return labels


def latency_plot(results: Results, path: Path, p: str = "p99") -> Path:
    """Mean (solid) and `p` (dashed) TTFT, TPOT and E2EL vs rate, one colour a config."""
    xs = _xs(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in zip(
        axes, ("ttft", "tpot", "e2el"), ("TTFT", "TPOT", "E2E latency"), strict=True
    ):
        for i, (name, runs) in enumerate(results.items()):
            color = f"C{i}"
            x = [xs.index(_rate_label(r["request_rate"])) for r in runs]
            ax.plot(
                x,
                [r[f"mean_{metric}_ms"] for r in runs],
                "o-",
                color=color,
                label=f"{name} mean",
            )
            if f"{p}_{metric}_ms" in runs[0]:
                ax.plot(
                    x,
                    [r[f"{p}_{metric}_ms"] for r in runs],
                    "s--",
                    color=color,
                    alpha=0.7,
                    label=f"{name} {p}",
                )
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}: mean (solid), {p} (dashed)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_plot(results: Results, path: Path) -> Path:
    xs = _xs(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, runs) in enumerate(results.items()):
        x = [xs.index(_rate_label(r["request_rate"])) for r in runs]
        axes[0].plot(x, [r["output_throughput"] for r in runs], "o-", color=f"C{i}", label=name)
        axes[1].plot(x, [r["request_throughput"] for r in runs], "o-", color=f"C{i}", label=name)
        if runs[0].get("request_goodput") is not None:
            axes[1].plot(
                x,
                [r["request_goodput"] for r in runs],
                "x:",
                color=f"C{i}",
                label=f"{name} goodput",
            )
    for ax, ylabel in zip(axes, ("output tokens/s", "requests/s"), strict=True):
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("Output token throughput")
    axes[1].set_title("Request throughput (and goodput)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Panel:
    """One row of a timeline figure: the `metrics_timeline` keys it draws, each with its line
    style and a suffix for the legend."""

    title: str
    ylabel: str
    lines: tuple[tuple[str, str, str], ...]
    ylim: tuple[float, float] | None = None


ACCEPTANCE = Panel(
    "draft acceptance rate", "accepted / drafted", (("acceptance_rate", ".-", ""),), (0.0, 1.0)
)
BUDGET = Panel("chosen budget (mean per request)", "draft tokens", (("budget_mean", ".-", ""),))
STEP_TIME = Panel(
    "step time: predicted (solid) vs measured (dashed)",
    "ms per step",
    (("predicted_step_ms", ".-", " predicted"), ("measured_step_ms", "x--", " measured")),
)
GOODPUT = Panel("policy's estimated goodput", "tokens/s", (("estimated_goodput_tok_s", ".-", ""),))
POLICY_PANELS = (BUDGET, STEP_TIME, GOODPUT)


def _has(results: Results, panel: Panel) -> bool:
    keys = {k for k, _, _ in panel.lines}
    return any(
        keys & row.keys()
        for runs in results.values()
        for run in runs
        for row in run.get("metrics_timeline") or []
    )


def timeline_plot(results: Results, panels: Sequence[Panel], path: Path) -> Path | None:
    """One row per panel that some run has data for, one column per rate; in each panel one
    line per configuration against seconds since that run's start. None (no file) when no
    run has data for any panel."""
    rows = [panel for panel in panels if _has(results, panel)]
    if not rows:
        return None
    xs = _xs(results)
    fig, axes = plt.subplots(
        len(rows),
        len(xs),
        figsize=(3.6 * len(xs) + 1.0, 3.2 * len(rows)),
        squeeze=False,
        sharey="row",
    )
    # Colours follow the configuration order of `results`, as in the rate plots.
    for i, (name, runs) in enumerate(results.items()):
        for run in runs:
            col = xs.index(_rate_label(run["request_rate"]))
            timeline = run.get("metrics_timeline") or []
            for r, panel in enumerate(rows):
                for key, style, suffix in panel.lines:
                    pts = [(row["t"], row[key]) for row in timeline if key in row]
                    if pts:
                        axes[r][col].plot(
                            [t for t, _ in pts],
                            [v for _, v in pts],
                            style,
                            color=f"C{i}",
                            label=f"{name}{suffix}",
                        )
    for r, panel in enumerate(rows):
        for col, rate in enumerate(xs):
            ax = axes[r][col]
            ax.set_title(f"{panel.title}\n@ {rate} req/s", fontsize=9)
            ax.set_xlabel("seconds since the run's start")
            if panel.ylim:
                ax.set_ylim(*panel.ylim)
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(panel.ylabel)
        # One legend per row, from whichever panel drew the most lines.
        richest = max(axes[r], key=lambda a: len(a.get_lines()))
        richest.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
