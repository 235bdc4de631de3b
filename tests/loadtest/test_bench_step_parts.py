"""bench_step_parts' bookkeeping: configurations by name, per-step part times, decode steps."""

from __future__ import annotations

import pytest

from loadtest.bench_step_parts import (
    DecodeStep,
    StepLog,
    decode_by_batch,
    main,
    paired_rounds,
    per_step_ms,
    print_results,
    speculative_config,
)


def test_configurations_by_name() -> None:
    assert speculative_config("none").method is None
    goodput = speculative_config("goodput")
    assert (goodput.method, goodput.policy, goodput.num_speculative_tokens) == (
        "ngram",
        "goodput",
        8,
    )
    fixed = speculative_config("fixed:2")
    assert (fixed.policy, fixed.num_speculative_tokens) == ("fixed", 2)
    # A tagged name is a replica: the same configuration, another engine.
    assert speculative_config("goodput#b") == goodput
    assert speculative_config("none#2").method is None


def test_a_name_given_twice_is_refused_before_any_engine_is_built() -> None:
    with pytest.raises(SystemExit) as refused:
        main(["--configs", "none", "goodput", "none", "--model", "/nonexistent"])
    assert refused.value.code == 2


def test_rounds_are_paired_replicas_pooled_and_controlled() -> None:
    speeds = {
        "none": [100.0, 80.0, 90.0],
        "goodput": [96.0, 80.0, 90.0],
        "none#b": [100.0, 80.0, 90.0],
        "goodput#b": [96.0, 80.0, 90.0 * 0.81],
    }
    paired = paired_rounds(speeds)
    assert paired["reference"] == "none"
    assert paired["replicas"] == {"none": ["none", "none#b"], "goodput": ["goodput", "goodput#b"]}
    # Per round, each round's own reference (the host's speed moves between rounds); the two
    # goodput engines pooled by the geometric mean: sqrt(1 x 0.81) = 0.9 in the last round.
    over = paired["over_reference"]["goodput"]
    assert over["ratios"] == pytest.approx([0.96, 1.0, 0.9])
    assert over["median"] == pytest.approx(0.96)
    assert over["low"] <= over["median"] <= over["high"]
    controls = paired["controls"]
    assert controls["none#b"]["ratios"] == pytest.approx([1.0, 1.0, 1.0])
    assert controls["goodput#b"]["ratios"] == pytest.approx([1.0, 1.0, 0.81])
    assert set(controls) == {"none#b", "goodput#b"}


def test_without_replicas_there_is_no_control() -> None:
    paired = paired_rounds({"none": [100.0, 90.0], "goodput": [95.0, 99.0]})
    assert paired["controls"] == {}
    assert paired["over_reference"]["goodput"]["ratios"] == pytest.approx([0.95, 1.1])


def test_part_times_are_per_step_and_decode_steps_group_by_batch() -> None:
    log = StepLog(steps=4)
    log.seconds["execute"] += 0.2
    log.seconds["fill"] += 0.004
    log.decode += [DecodeStep(8, 0.05, 8), DecodeStep(8, 0.07, 11), DecodeStep(3, 0.02, 3)]
    assert per_step_ms(log) == pytest.approx({"execute": 50.0, "fill": 1.0})
    by_batch = decode_by_batch(log)
    assert list(by_batch) == [3, 8]
    assert by_batch[8] == pytest.approx({"steps": 2, "seconds": 0.12, "tokens": 19})


def test_results_print_the_drafts_each_configuration_verified(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = {
        "median_tokens_per_s": 100.0,
        "tokens_per_s": [100.0],
        "steps": 10,
        "ms_per_step": {"execute": 50.0},
        "decode_by_batch": {},
    }
    results = {
        "load_average_before": [1.0],
        "load_average_after": [1.0],
        "configs": {
            "none": config | {"drafts_tokens_accepted": [(0, 0, 0)]},
            "goodput@suffix": config | {"drafts_tokens_accepted": [(4, 20, 14), (6, 30, 22)]},
        },
    }
    print_results(results)
    out = capsys.readouterr().out
    assert "10 drafts verified, 50 draft tokens, 36 accepted (3.60 a draft)" in out
    assert out.count("drafts verified") == 1  # not for a configuration that never drafted


def test_results_print_the_paired_ratios_and_the_control(
    capsys: pytest.CaptureFixture[str],
) -> None:
    speeds = {"none": [100.0, 90.0], "goodput": [95.0, 99.0], "none#b": [100.0, 90.0]}
    results = {
        "load_average_before": [1.0],
        "load_average_after": [1.0],
        "configs": {},
        "paired": paired_rounds(speeds),
    }
    print_results(results)
    out = capsys.readouterr().out
    assert "tokens/s over none's (2 engine(s) pooled)" in out
    assert "goodput (1 engine(s))" in out
    assert "A/A control" in out
    assert "0.950 1.100" in out  # goodput's rounds over the pooled reference, in order
