"""The simulation's PNG: per workload, mean (solid) and p99 (dashed) E2E latency vs rate, one
colour per policy (log y: latency explodes past saturation), and the mean chosen budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg")


def _x(rate: Any) -> float:
    return float("nan") if rate == "inf" else float(rate)


def plot_results(
    results: dict[str, dict[str, list[dict[str, Any]]]], title: str, path: Path
) -> Path:
    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.4 * rows), squeeze=False)
    for (workload, by_policy), (lat, bud) in zip(results.items(), axes, strict=True):
        rates = [r["request_rate"] for r in next(iter(by_policy.values()))]
        # Categorical x when there is an inf rate (as the sweep report's plots), else numeric.
        categorical = "inf" in rates
        xs = list(range(len(rates))) if categorical else [_x(r) for r in rates]
        for i, (policy, runs) in enumerate(by_policy.items()):
            color = f"C{i}"
            lat.plot(xs, [r["mean_e2el_ms"] / 1e3 for r in runs], "o-", color=color, label=policy)
            lat.plot(xs, [r["p99_e2el_ms"] / 1e3 for r in runs], "s--", color=color, alpha=0.6)
            bud.plot(xs, [r["mean_budget"] for r in runs], "o-", color=color, label=policy)
        for ax in (lat, bud):
            ax.set_xlabel("request rate (req/s)")
            ax.grid(True, alpha=0.3)
            if categorical:
                ax.set_xticks(xs, [str(r) for r in rates])
        lat.set_yscale("log")
        lat.set_ylabel("E2E latency (s): mean solid, p99 dashed")
        lat.set_title(f"{title}: {workload}")
        lat.legend(fontsize=8)
        bud.set_ylabel("mean chosen budget (drafts / request-step)")
        bud.set_title("budget the policy chose")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
