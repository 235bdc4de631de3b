"""The soak's analysis and outputs: latency windows, memory growth, error tally, soak.md, soak.png.

Everything here is a pure function of the records and samples (or of soak.json's dict), so it
is tested on synthetic data and a report can be re-rendered from a saved soak.json.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg")

from loadtest.soak_load import EXPECTED, GENERATION_KINDS, KINDS, OK, OUTCOMES, UNEXPECTED, Record

MIB = 2**20


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_windows(
    records: Sequence[Record], duration_s: float, n_windows: int = 10
) -> list[dict[str, Any]]:
    """p50/p99 latency of the successful generation requests started in each of `n_windows`
    equal slices of the run, with the failures started there. Requests started at or after
    `duration_s` (none, in a closed loop that stops at the deadline) count in the last slice.
    Cancelled and bad requests are left out of the latencies: they end when the client or the
    validation decides, not when generation does."""
    width = duration_s / n_windows
    buckets: list[list[Record]] = [[] for _ in range(n_windows)]
    for r in records:
        buckets[min(max(int(r.t // width), 0), n_windows - 1)].append(r)
    out = []
    for i, bucket in enumerate(buckets):
        lat = [r.latency_s for r in bucket if r.kind in GENERATION_KINDS and r.outcome == OK]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        out.append(
            {
                "start_s": round(i * width, 3),
                "end_s": round((i + 1) * width, 3),
                "requests": len(bucket),
                "latency_requests": len(lat),
                "p50_s": None if p50 is None else round(p50, 4),
                "p99_s": None if p99 is None else round(p99, 4),
                "unexpected_errors": sum(r.outcome in UNEXPECTED for r in bucket),
            }
        )
    return out


def p99_drift(windows: Sequence[dict[str, Any]]) -> float | None:
    """Last window's p99 / first window's (the first and last that have latencies)."""
    p99s = [w["p99_s"] for w in windows if w["p99_s"]]
    return round(p99s[-1] / p99s[0], 3) if len(p99s) >= 2 else None


def memory_growth(
    samples: Sequence[dict[str, Any]],
    duration_s: float,
    warmup_frac: float = 0.1,
    edge_frac: float = 0.2,
) -> dict[str, Any]:
    """Median RSS of the last `edge_frac` of the samples minus that of the first `edge_frac`,
    leaving out the samples of the first `warmup_frac` of the run (the allocator and the
    caches fill up there; that is growth a long run pays once, not a leak)."""
    warmup_s = warmup_frac * duration_s
    rss = [
        s["rss_bytes"]
        for s in samples
        if s.get("rss_bytes") is not None and warmup_s <= s["t"] <= duration_s
    ]
    out: dict[str, Any] = {"warmup_s": round(warmup_s, 1), "samples": len(rss)}
    if len(rss) < 2:
        return {**out, "growth_bytes": None}
    k = max(1, round(edge_frac * len(rss)))
    start, end = statistics.median(rss[:k]), statistics.median(rss[-k:])
    return {
        **out,
        "edge_samples": k,
        "start_median_bytes": int(start),
        "end_median_bytes": int(end),
        "growth_bytes": int(end - start),
        "growth_pct": round(100 * (end - start) / start, 2) if start else None,
    }


def tally(records: Sequence[Record]) -> dict[str, Any]:
    """Requests by kind and outcome, failures by outcome, and a few failures to read."""
    by_kind = {k: dict.fromkeys(OUTCOMES, 0) for k in KINDS}
    for r in records:
        by_kind.setdefault(r.kind, dict.fromkeys(OUTCOMES, 0))[r.outcome] += 1
    errors = {o: sum(c[o] for c in by_kind.values()) for o in OUTCOMES if o != OK}
    return {
        "requests": len(records),
        "by_kind": by_kind,
        "errors": errors,
        "unexpected_errors": sum(errors[o] for o in UNEXPECTED),
        "unexpected_examples": [
            f"t={r.t:.1f}s {r.kind}: {r.outcome} {r.detail}"
            for r in records
            if r.outcome in UNEXPECTED
        ][:10],
    }


def summarize(
    records: Sequence[Record],
    samples: Sequence[dict[str, Any]],
    duration_s: float,
    n_windows: int = 10,
) -> dict[str, Any]:
    windows = latency_windows(records, duration_s, n_windows)
    return {
        **tally(records),
        "memory": memory_growth(samples, duration_s),
        "latency": {"windows": windows, "p99_drift": p99_drift(windows)},
    }


# --- soak.md ------------------------------------------------------------------------------


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:.1f} MiB"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.0f}"


def render_markdown(result: dict[str, Any]) -> str:
    cfg, mem, lat = result["config"], result["memory"], result["latency"]
    m = result["machine"]
    verdict = "PASS" if result["passed"] else "FAIL"
    leaked = result["leaked_blocks"]
    lines = [
        f"# Soak: {cfg['model']}, {cfg['duration_s']:g} s, {cfg['concurrency']} concurrent,"
        f" {m['date']}",
        "",
        f"Result: **{verdict}** ({'unknown' if leaked is None else leaked} leaked KV blocks,"
        f" {result['unexpected_errors']} unexpected errors).",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}."
        f" Load average (1, 5, 15 min) at start: {result['loadavg_at_start']}; at end:"
        f" {result['loadavg_at_end']}.",
        "",
        f"Server: `specd serve {shlex.join(cfg['serve_args'])}`; it ran {result['elapsed_s']:.0f} s"
        f" in all and exited with code {result['server_exit_code']}.",
        "",
        "![latency, RSS and KV blocks over time](soak.png)",
        "",
        "## Requests",
        "",
        "| kind | requests | " + " | ".join(o.replace("_", " ") for o in OUTCOMES) + " |",
        "|---|---:|" + "---:|" * len(OUTCOMES),
    ]
    for kind, counts in result["by_kind"].items():
        cells = " | ".join(str(counts[o]) for o in OUTCOMES)
        lines.append(f"| {kind} | {sum(counts.values())} | {cells} |")
    errors = result["errors"]
    lines += [
        "",
        f"{result['requests']} requests. Errors by kind: "
        + ", ".join(f"{o} {errors[o]}" for o in UNEXPECTED)
        + f"; {EXPECTED} (the bad requests, refused as they must be): {errors[EXPECTED]}.",
    ]
    if result["unexpected_examples"]:
        lines += ["", "First unexpected errors:", ""]
        lines += [f"- {e}" for e in result["unexpected_examples"]]
    growth = mem.get("growth_bytes")
    lines += [
        "",
        "## Leaks and memory",
        "",
        f"- KV blocks still in use once the server was idle again: **{leaked}**"
        f" (idle {'reached' if result['idle_reached'] else 'NOT reached'}"
        f" {result['idle_wait_s']:.1f} s after the load).",
    ]
    if growth is None:
        lines.append(f"- Memory growth: too few RSS samples ({mem['samples']}).")
    else:
        lines.append(
            f"- Server RSS (the API process and its children, engine core included): median"
            f" {_mib(mem['start_median_bytes'])} over the first {mem['edge_samples']} samples"
            f" after a {mem['warmup_s']:g} s warm-up, {_mib(mem['end_median_bytes'])} over the"
            f" last {mem['edge_samples']}: growth **{growth / MIB:+.1f} MiB**"
            f" ({mem['growth_pct']:+.2f}%)."
        )
    spec = result.get("spec_decode") or {}
    if spec.get("draft_tokens"):
        lines.append(
            f"- Speculation: {spec['draft_tokens']:.0f} draft tokens proposed,"
            f" {spec['accepted_tokens']:.0f} accepted ({spec['acceptance']:.2f})."
        )
    rejected = {k: v for k, v in (result.get("final", {}).get("rejected") or {}).items() if v}
    if rejected:
        counts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(rejected.items()))
        lines.append(f"- Requests the server counted as rejected, by reason: {counts}.")
    drift = lat["p99_drift"]
    lines += [
        "",
        "## Latency over time",
        "",
        "Successful generation requests (not the cancelled or bad ones), by start time.",
        "",
        "| window | start s | end s | requests | of which timed | p50 ms | p99 ms |"
        " unexpected errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, w in enumerate(lat["windows"]):
        lines.append(
            f"| {i + 1} | {w['start_s']:g} | {w['end_s']:g} | {w['requests']} |"
            f" {w['latency_requests']} | {_ms(w['p50_s'])} | {_ms(w['p99_s'])} |"
            f" {w['unexpected_errors']} |"
        )
    lines += [
        "",
        f"p99 drift (last window / first window): **{'-' if drift is None else f'{drift:.2f}x'}**",
        "",
    ]
    return "\n".join(lines)


# --- soak.png -----------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> Path:
    """Three panels over run time: p50/p99 latency per window, RSS, KV blocks in use."""
    fig, (ax_lat, ax_rss, ax_kv) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    windows = [w for w in result["latency"]["windows"] if w["p99_s"] is not None]
    mids = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    ax_lat.plot(mids, [1000 * w["p50_s"] for w in windows], "o-", label="p50")
    ax_lat.plot(mids, [1000 * w["p99_s"] for w in windows], "s--", label="p99")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("generation requests by start time")
    ax_lat.legend()
    samples = result["samples"]
    rss = [(s["t"], s["rss_bytes"] / MIB) for s in samples if s.get("rss_bytes") is not None]
    if rss:
        ax_rss.plot(*zip(*rss, strict=True), ".-")
    ax_rss.set_ylabel("server RSS (MiB)")
    kv = [(s["t"], s["kv_used"]) for s in samples if s.get("kv_used") is not None]
    if kv:
        ax_kv.plot(*zip(*kv, strict=True), ".-", label="under load")
    final = result.get("final") or {}
    if final.get("kv_used") is not None:
        ax_kv.plot([final["t"]], [final["kv_used"]], "rx", ms=10, label="idle after the load")
        ax_kv.legend()
    # The total is named, not drawn: thousands of blocks would flatten a used count of tens.
    totals = [s["kv_total"] for s in samples if s.get("kv_total")]
    ax_kv.set_ylabel(f"KV blocks used (of {totals[-1]:.0f})" if totals else "KV blocks used")
    ax_kv.set_xlabel("seconds since the load began (red: end of the load)")
    for ax in (ax_lat, ax_rss, ax_kv):
        ax.grid(alpha=0.3)
        ax.axvline(result["config"]["duration_s"], color="red", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
