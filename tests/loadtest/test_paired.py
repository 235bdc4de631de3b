"""Paired-run ratios with an A/A control, checked on sweep summaries with known answers."""

from __future__ import annotations

import json
import math

import pytest

from loadtest.paired import Cell, cells, main, median_interval, paired_ratios


def _run(rate: str, repeat: int, e2e: float) -> dict[str, object]:
    return {"request_rate": rate, "repeat": repeat, "mean_e2el_ms": e2e, "completed": 32}


def _config(rate: str, values: list[float]) -> list[dict[str, object]]:
    return [_run(rate, i, v) for i, v in enumerate(values)]


def _summary() -> dict[str, dict[str, list[dict[str, object]]]]:
    # Rounds differ a lot (1000, 1500, 800 ms); within a round, auto is 10% slower than
    # suffix-a at rate 1 and 2% faster at inf, and suffix-b strays +-3%.
    return {
        "mix": {
            "suffix-a": _config("1.0", [1000, 1500, 800]) + _config("inf", [7000, 8000, 7500]),
            "suffix-b": _config("1.0", [1030, 1455, 824]) + _config("inf", [7210, 7760, 7500]),
            "auto-goodput": _config("1.0", [1100, 1650, 880]) + _config("inf", [6860, 7840, 7350]),
        }
    }


def test_runs_are_paired_by_round_not_by_cell_medians() -> None:
    ratios = paired_ratios(_summary()["mix"], "auto-goodput", "suffix-a", "mean_e2el_ms")
    assert ratios[1.0] == pytest.approx([1.1, 1.1, 1.1])
    assert ratios[math.inf] == pytest.approx([0.98, 0.98, 0.98])


def test_a_round_one_configuration_missed_is_left_out() -> None:
    summary = _summary()
    summary["mix"]["auto-goodput"][1]["completed"] = 0  # rate 1, round 1 failed
    ratios = paired_ratios(summary["mix"], "auto-goodput", "suffix-a", "mean_e2el_ms")
    assert ratios[1.0] == pytest.approx([1.1, 1.1])


def test_runs_without_a_repeat_index_pair_by_their_order_within_the_rate() -> None:
    configs = {
        name: [{k: v for k, v in run.items() if k != "repeat"} for run in runs]
        for name, runs in _summary()["mix"].items()
    }
    ratios = paired_ratios(configs, "auto-goodput", "suffix-a", "mean_e2el_ms")
    assert ratios[1.0] == pytest.approx([1.1, 1.1, 1.1])
    assert ratios[math.inf] == pytest.approx([0.98, 0.98, 0.98])


def test_median_interval_of_identical_ratios_is_a_point_and_widens_with_spread() -> None:
    assert median_interval([1.1, 1.1, 1.1]).low == pytest.approx(1.1)
    wide = median_interval([0.8, 1.0, 1.3, 0.9, 1.2])
    assert wide.low < wide.median == 1.0 < wide.high


def test_verdicts_against_the_control() -> None:
    found = {
        c.rate: c
        for c in cells([_summary()], "auto-goodput", ["suffix-a"], ["suffix-b"], "mean_e2el_ms")
    }
    # Rate 1: 1.1x in every round, the control within 3%: slower.
    assert found[1.0].verdict(1.05) == "slower"
    assert found[math.inf].verdict(1.05) == "no worse"
    # The control strays as far as the policy: within noise.
    noisy = Cell("mix", 2.0, [1.08, 1.12, 1.0], [0.9, 1.15, 1.2])
    assert noisy.verdict(1.05) == "within noise"
    # No control: slower only when the interval's low end is above 1.
    assert Cell("mix", 2.0, [1.08, 1.12, 0.95], []).verdict(1.05) == "within noise"


def test_reports_pool_under_different_baseline_names() -> None:
    old = {
        "mix": {"suffix-goodput": _config("1.0", [1000]), "auto-goodput": _config("1.0", [1200])}
    }
    found = cells(
        [_summary(), old],
        "auto-goodput",
        ["suffix-a", "suffix-goodput"],
        ["suffix-b"],
        "mean_e2el_ms",
    )
    rate_1 = next(c for c in found if c.rate == 1.0)
    assert rate_1.policy == pytest.approx([1.1, 1.1, 1.1, 1.2])
    assert len(rate_1.control) == 3  # the old report has no control


def test_cli_writes_the_table_and_the_plot(tmp_path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({"summary": _summary()}))
    code = main(
        [
            str(tmp_path),
            "--policy",
            "auto-goodput",
            "--baseline",
            "suffix-a",
            "--control",
            "suffix-b",
        ]
    )
    assert code == 0
    text = (tmp_path / "paired.md").read_text()
    assert "| mix | 1 | 1.100 (1.10-1.10, n=3) |" in text
    assert "| slower |" in text and "| no worse |" in text
    assert (tmp_path / "paired.png").stat().st_size > 0


def test_cli_fails_when_nothing_pairs(tmp_path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({"summary": _summary()}))
    assert main([str(tmp_path), "--policy", "recycle-goodput", "--baseline", "suffix-a"]) == 1
