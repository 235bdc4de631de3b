"""Folding repeated runs of one sweep cell into their median."""

from __future__ import annotations

from loadtest.repeats import first_runs, group_by_rate, median_run, median_runs


def _run(rate: object, e2el: float, repeat: int, accept: float | None = None) -> dict:
    run: dict = {
        "request_rate": rate,
        "mean_e2el_ms": e2el,
        "completed": 32,
        "repeat": repeat,
        "ok": True,
        "itls": [[e2el]],
        "label": f"rep{repeat}",
    }
    if accept is not None:
        run["spec_decode"] = {"acceptance_rate": accept, "method": "ngram"}
    return run


def test_median_of_each_number_and_the_first_run_for_the_rest() -> None:
    runs = [_run(0.5, 100.0, 0, 0.2), _run(0.5, 300.0, 1, 0.9), _run(0.5, 120.0, 2, 0.5)]
    m = median_run(runs)
    assert m["mean_e2el_ms"] == 120.0 and m["completed"] == 32 and m["repeats"] == 3
    assert m["spec_decode"] == {"acceptance_rate": 0.5, "method": "ngram"}
    assert m["ok"] is True  # a bool is not a number to take the median of
    assert m["itls"] == [[100.0]] and m["label"] == "rep0"  # lists and text: the first run's
    assert median_run(runs[:1]) is runs[0]


def test_runs_group_by_rate_in_the_order_rates_first_ran() -> None:
    runs = [_run("inf", 9.0, 0), _run(0.25, 1.0, 0), _run("inf", 7.0, 1), _run(0.25, 3.0, 1)]
    assert list(group_by_rate(runs)) == [float("inf"), 0.25]
    assert [r["mean_e2el_ms"] for r in median_runs(runs)] == [8.0, 2.0]
    assert [r["repeat"] for r in first_runs(runs)] == [0, 0]
