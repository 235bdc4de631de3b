"""The headline sweep's bars, checked on a sweep summary with known answers."""

from __future__ import annotations

import json
import math

from loadtest.policy_bars import Bars, RateCheck, main, markdown, missed_bars, rate_checks


def _run(rate: str, e2e: float) -> dict[str, object]:
    return {"request_rate": rate, "mean_e2el_ms": e2e, "completed": 32}


def _summary() -> dict[str, dict[str, list[dict[str, object]]]]:
    return {
        "repetitive": {
            "no-spec": [_run("0.25", 3000.0), _run("inf", 10000.0)],
            "ngram-k4": [_run("0.25", 2200.0), _run("inf", 9000.0)],
            "goodput": [_run("0.25", 1900.0), _run("inf", 9600.0)],
        },
        "mix": {
            "no-spec": [_run("0.25", 3000.0)],
            "ngram-k4": [_run("0.25", 2600.0)],
            "goodput": [_run("0.25", 2600.0)],
        },
    }


def test_rate_checks_pick_the_best_other_per_rate() -> None:
    checks = rate_checks(_summary(), Bars())
    rep = [c for c in checks if c.dataset == "repetitive"]
    assert [c.rate for c in rep] == [0.25, math.inf]
    assert rep[0].best_other == "ngram-k4" and rep[0].best_other_ms == 2200.0
    assert rep[1].vs_best == 9600.0 / 9000.0
    assert rep[1].vs_baseline == 0.96


def test_markdown_names_every_missed_bar() -> None:
    text = markdown(rate_checks(_summary(), Bars()), Bars(), "test")
    # repetitive @ 0.25: 3000/1900 = 1.58x >= 1.5 and best of all: passes.
    assert "| repetitive | 0.25 | 1900 | ngram-k4 | 2200 | 0.86x |" in text
    # repetitive @ inf: 1.07x the best other (fixed k4) -> missed.
    assert "- repetitive @ inf: 1.07x the best other (ngram-k4)" in text
    # mix @ 0.25: only 1.15x faster than no-spec, the bar is 1.2x.
    assert "- mix @ 0.25: lowest-rate speed-up 1.15x < 1.2x" in text
    assert "Every bar holds" not in text


def test_cli_writes_bars_md(tmp_path) -> None:
    summary = {"repetitive": _summary()["repetitive"]}
    summary["repetitive"]["goodput"][1]["mean_e2el_ms"] = 9000.0
    (tmp_path / "sweep.json").write_text(json.dumps({"summary": summary}))
    assert main([str(tmp_path)]) == 0
    assert "Every bar holds." in (tmp_path / "bars.md").read_text()


def test_a_sweep_without_the_baseline_checks_nothing_and_says_so(tmp_path, capsys) -> None:
    summary = {"mix": {k: v for k, v in _summary()["mix"].items() if k != "no-spec"}}
    (tmp_path / "sweep.json").write_text(json.dumps({"summary": summary}))
    assert main([str(tmp_path)]) == 1
    assert "no rate" in capsys.readouterr().err
    assert not (tmp_path / "bars.md").exists()


def test_among_limits_the_others(tmp_path) -> None:
    summary = _summary()
    summary["repetitive"]["auto-goodput"] = [_run("0.25", 1800.0), _run("inf", 9100.0)]
    # goodput against its own drafter's configurations: auto-goodput is not among them.
    among = Bars(among=("no-spec", "ngram-k4"))
    rep = [c for c in rate_checks(summary, among) if c.dataset == "repetitive"]
    assert [c.best_other for c in rep] == ["ngram-k4", "ngram-k4"]
    # auto-goodput against the drafters under the same policy.
    (tmp_path / "sweep.json").write_text(json.dumps({"summary": summary}))
    argv = [str(tmp_path), "--policy", "auto-goodput", "--among", "goodput", "no-spec",
            "--lowest-rate-speedup", "--out", "bars-drafters.md"]  # fmt: skip
    assert main(argv) == 0
    text = (tmp_path / "bars-drafters.md").read_text()
    assert "| repetitive | 0.25 | 1800 | goodput | 1900 |" in text


def test_repeated_runs_are_judged_on_their_median() -> None:
    """Three runs per cell; goodput's second run met a busy neighbour (a 63% swing, as seen
    between two sweeps). The median, not the mean, decides, and the table says so."""
    summary = {
        "repetitive": {
            "no-spec": [_run("0.25", 3000.0), _run("0.25", 3300.0), _run("0.25", 2900.0)],
            "goodput": [_run("0.25", 1900.0), _run("0.25", 4900.0), _run("0.25", 1950.0)],
        }
    }
    (check,) = rate_checks(summary, Bars())
    assert check.policy_ms == 1950.0 and check.baseline_ms == 3000.0 and check.runs == 3
    text = markdown([check], Bars(), "test")
    assert "median of 3 runs" in text and "Every bar holds." in text
    summary["repetitive"]["goodput"].pop()  # an unfinished repeat: the median of two
    (check,) = rate_checks(summary, Bars())
    assert check.policy_ms == 3400.0 and check.runs == 2


def test_a_near_miss_is_not_printed_as_the_bar_itself() -> None:
    check = RateCheck("mix", 0.25, 1608.0, "ngram-k2", 1702.0, 1926.0)  # 1.198x over none
    assert missed_bars(check, Bars(), lowest_rate=True) == ["lowest-rate speed-up 1.198x < 1.2x"]
    clear = RateCheck("mix", 0.25, 1600.0, "ngram-k2", 1702.0, 1840.0)  # 1.15x: two decimals
    assert missed_bars(clear, Bars(), lowest_rate=True) == ["lowest-rate speed-up 1.15x < 1.2x"]
