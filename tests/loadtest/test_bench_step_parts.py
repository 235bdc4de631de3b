"""bench_step_parts' bookkeeping: configurations by name, per-step part times, decode steps."""

from __future__ import annotations

import pytest

from loadtest.bench_step_parts import (
    DecodeStep,
    StepLog,
    decode_by_batch,
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
