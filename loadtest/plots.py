"""The report's PNGs (matplotlib, Agg). Rates are categorical on the x axis: "inf" included."""

from __future__ import annotations

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
    """Median (solid) and `p` (dashed) TTFT, TPOT and E2EL vs rate, one colour a config."""
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
                [r[f"median_{metric}_ms"] for r in runs],
                "o-",
                color=color,
                label=f"{name} median",
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
        ax.set_title(title)
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


def spec_timeline_plot(results: Results, path: Path) -> Path | None:
    """Acceptance rate and any budget series over time, runs of one configuration laid end to
    end (a dotted line where the rate changes). None when no server exported them."""
    series: dict[str, tuple[list[float], list[float], dict[str, list[tuple[float, float]]]]] = {}
    # Where one rate's run ends and the next begins, for the first configuration plotted.
    bounds: list[float] = []
    for name, runs in results.items():
        t_off, ts, acc, ends = 0.0, [], [], []
        budgets: dict[str, list[tuple[float, float]]] = {}
        for run in runs:
            rows = run.get("metrics_timeline") or []
            for row in rows:
                if "acceptance_rate" in row:
                    ts.append(t_off + row["t"])
                    acc.append(row["acceptance_rate"])
                for k, v in row.items():
                    if "budget" in k:
                        budgets.setdefault(k, []).append((t_off + row["t"], v))
            t_off += max([row["t"] for row in rows], default=run["duration"])
            ends.append(t_off)
        if acc or budgets:
            series[name] = (ts, acc, budgets)
            bounds = bounds or ends[:-1]
    if not series:
        return None
    has_budget = any(b for _, _, b in series.values())
    fig, axes = plt.subplots(
        1, 2 if has_budget else 1, figsize=(12 if has_budget else 7, 4.2), squeeze=False
    )
    for i, (name, (ts, acc, budgets)) in enumerate(series.items()):
        axes[0][0].plot(ts, acc, ".-", color=f"C{i}", label=name)
        for j, (k, pts) in enumerate(budgets.items()):
            axes[0][1].plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                ".-",
                color=f"C{i}",
                alpha=1.0 - 0.3 * j,
                label=f"{name} {k}",
            )
    axes[0][0].set_title("Draft acceptance rate (per scrape interval)")
    axes[0][0].set_ylim(0, 1)
    axes[0][0].set_ylabel("accepted / drafted")
    if has_budget:
        axes[0][1].set_title("Chosen speculation budget")
        axes[0][1].set_ylabel("draft tokens")
    for ax in axes[0]:
        for b in bounds:
            ax.axvline(b, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("time (s; rates back to back, dotted: next rate, first config)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
