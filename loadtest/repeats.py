"""Repeated runs of one (configuration, dataset, rate), folded into one: the median.

A sweep with ``repeats: N`` runs every cell N times. Its tables list every run, and what is
compared (plots, ``loadtest.policy_bars``) is the median of each number over a cell's runs:
the median, not the mean, because one run that met a busy neighbour moves a mean of three by
a third of its excess and a median not at all.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

Run = dict[str, Any]


def rate_key(run: Run) -> float:
    return float(run["request_rate"])  # "inf" parses too


def format_rate(rate: float) -> str:
    """A rate as reports print it: ``0.25``, ``2``, ``inf``."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def group_by_rate(runs: list[Run]) -> dict[float, list[Run]]:
    """A configuration's runs by rate, rates in the order they first appear."""
    out: dict[float, list[Run]] = {}
    for run in runs:
        out.setdefault(rate_key(run), []).append(run)
    return out


def has_repeats(results: dict[str, list[Run]]) -> bool:
    """Whether any configuration ran some rate more than once."""
    return any(len(g) > 1 for runs in results.values() for g in group_by_rate(runs).values())


def median_run(runs: list[Run]) -> Run:
    """One run standing for ``runs`` (all of one cell): every top-level number and every
    number of a nested dict (``spec_decode``) is the median over the runs that have it;
    anything else (per-request lists, time series) is the first run's. ``repeats`` says how
    many runs it stands for."""
    first = runs[0]
    if len(runs) == 1:
        return first
    out: Run = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _median_dict([r.get(key) for r in runs])
        elif _is_number(value):
            out[key] = _median([r.get(key) for r in runs])
        else:
            out[key] = value
    out["repeat"] = first.get("repeat", 0)  # which run it is, not a quantity
    out["repeats"] = len(runs)
    return out


def median_runs(runs: list[Run]) -> list[Run]:
    """``median_run`` of each rate's runs, in rate order of first appearance."""
    return [median_run(group) for group in group_by_rate(runs).values()]


def first_runs(runs: list[Run]) -> list[Run]:
    """Each rate's first run (time series are shown for one run, not a median of several)."""
    return [group[0] for group in group_by_rate(runs).values()]


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _median(values: list[object]) -> float | None:
    numbers = [float(v) for v in values if _is_number(v)]  # type: ignore[arg-type]
    return statistics.median(numbers) if numbers else None


def _median_dict(values: list[object]) -> dict[str, Any]:
    dicts = [v for v in values if isinstance(v, dict)]
    first = dicts[0] if dicts else {}
    return {k: _median([d.get(k) for d in dicts]) if _is_number(v) else v for k, v in first.items()}
