"""The simulator (loadtest/sim/): closed-form latencies, token accounting, policy sanity,
clean shutdown of every run, reproducibility, and the config / compare / CLI plumbing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from loadtest import simulate as simulate_cli
from loadtest.sim import dists
from loadtest.sim.compare import compare, load_sweep_runs
from loadtest.sim.config import EngineSettings, PolicySpec, Workload, parse_config
from loadtest.sim.cost import CoefficientCost, SmartSpecCost, load_coefficients
from loadtest.sim.drafter import DRAFT_TOKEN, SimDrafter
from loadtest.sim.engine import RunResult, SimRequest, simulate
from loadtest.sim.runner import BONUS_TOKEN, SimRunner
from loadtest.sim.sweep import run_config
from loadtest.sim.trace import make_trace
from server.engine.plan import StepPlan
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.spec_decode.cost_model import StepShape

ENGINE = EngineSettings.from_flat(
    dict(max_num_seqs=256, max_num_batched_tokens=8192, num_blocks=50_000, max_model_len=8192)
)
NONE = PolicySpec("none", "none", 8)
GOODPUT = PolicySpec("goodput", "goodput", 8)


def _workload(alpha: object, output: object = 64, prompt: object = 200) -> Workload:
    return Workload("w", prompt, output, alpha)


def _mean_e2e(run: RunResult) -> float:
    return float(np.mean([r.e2e for r in run.requests]))


def _assert_clean(run: RunResult, requests: list[SimRequest]) -> None:
    """Every request finished with its full output, and every KV block is free again."""
    assert run.unfinished == 0
    assert run.blocks_in_use == 0
    assert sorted(r.num_output_tokens for r in run.requests) == sorted(
        r.output_len for r in requests
    )


# ---- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [NONE, PolicySpec("off", "off", 0)])
def test_lone_requests_take_prefill_plus_decode_steps_smartspec(policy: PolicySpec) -> None:
    # Arrivals ~1000 s apart: each request runs alone, one prefill step then out - 1 decodes.
    trace = make_trace(
        _workload(0.7, {"uniform": [8, 40]}, {"uniform": [50, 400]}), 1e-3, 6, seed=1, stream=0
    )
    run = simulate(trace, policy, ENGINE, "free", SmartSpecCost())
    _assert_clean(run, trace)
    for sim, rec in zip(sorted(trace, key=lambda r: r.arrival), run.requests, strict=True):
        p, out = sim.prompt_len, sim.output_len
        prefill_ms = 4.86e-5 * p + 1.84e-2 * p - 4.33e-2 + 6.94
        # Decode j attends to the prompt and j tokens (its own included).
        decode_ms = sum(4.86e-5 * (p + j) + 1.84e-2 - 4.33e-2 + 6.94 for j in range(1, out))
        assert rec.ttft == pytest.approx(prefill_ms / 1e3, rel=1e-9)
        assert rec.e2e == pytest.approx((prefill_ms + decode_ms) / 1e3, rel=1e-9)
    assert run.steps[0].start == pytest.approx(trace[0].arrival)  # idle: jump to arrivals


def test_lone_request_latency_is_prefill_plus_output_len_decodes_coefficients() -> None:
    # A cost flat in context: every decode step costs the same, so E2E is a product.
    cost = CoefficientCost({"intercept": 0.010, "rows": 0.0001})
    sim = SimRequest("a", arrival=3.0, prompt_len=100, output_len=30, alpha=0.5)
    run = simulate([sim], NONE, ENGINE, "free", cost)
    (rec,) = run.requests
    prefill, decode = 0.010 + 100 * 0.0001, 0.010 + 0.0001
    assert rec.first_token == pytest.approx(3.0 + prefill)
    # The prefill step samples the first token; each of the other out - 1 takes a decode.
    assert rec.e2e == pytest.approx(prefill + 29 * decode)
    assert rec.tpot == pytest.approx(decode)


def test_fixed_k_with_perfect_drafts_emits_k_plus_one_every_step() -> None:
    k, steps = 3, 5
    out = 1 + steps * (k + 1)  # the prefill's token, then `steps` full chains
    trace = [SimRequest(f"r{i}", 0.0, 50 + i, out, alpha=1.0, seed=i) for i in range(4)]
    run = simulate(trace, PolicySpec("fixed-k3", "fixed", k), ENGINE, "free", SmartSpecCost())
    _assert_clean(run, trace)
    prefill, *decodes = run.steps
    assert prefill.num_drafts == 0 and prefill.emitted == 4
    assert len(decodes) == steps
    for step in decodes:
        assert step.num_requests == 4
        assert step.num_drafts == 4 * k
        assert step.emitted == 4 * (k + 1)
    assert run.num_draft_tokens == run.num_accepted_tokens == 4 * steps * k


def test_useless_drafts_accept_nothing_and_still_emit_one_token() -> None:
    trace = [SimRequest("r", 0.0, 50, 20, alpha=0.0)]
    run = simulate(trace, PolicySpec("fixed-k4", "fixed", 4), ENGINE, "free", SmartSpecCost())
    _assert_clean(run, trace)
    assert run.num_accepted_tokens == 0 and run.num_draft_tokens > 0
    assert all(s.emitted == 1 for s in run.steps)


def test_a_plain_decode_emits_the_token_a_right_draft_would_have_guessed() -> None:
    """Where the request's draft for an output position would be accepted (u < alpha), plain
    decoding emits DRAFT_TOKEN there: an unverified (shadow) draft is then scored as verifying
    it would have scored it. Before, plain decodes always emitted BONUS_TOKEN, so every shadow
    draft counted as rejected and drove the learned policies' estimates to 0."""
    runner = SimRunner()
    runner.add("r", 0.5, np.array([0.1, 0.9, 0.4, 0.7]))
    r = Request("r", [5, 6, 7], SamplingParams(max_tokens=4), frozenset(), 1024)
    emitted = []
    for _ in range(4):
        n = r.num_tokens - r.num_computed_tokens
        (token,) = runner.execute(StepPlan([r], {"r": n})).sampled_token_ids["r"]
        r.num_computed_tokens += n
        r.append_output_token(token)
        emitted.append(token)
    assert emitted == [DRAFT_TOKEN, BONUS_TOKEN, DRAFT_TOKEN, BONUS_TOKEN]


# ---- the policies ---------------------------------------------------------------------------


def test_goodput_beats_no_speculation_when_drafts_are_cheap_and_right() -> None:
    trace = make_trace(_workload({"uniform": [0.8, 0.95]}, {"uniform": [64, 128]}), 0.5, 20, 0, 0)
    none = simulate(trace, NONE, ENGINE, "free", SmartSpecCost())
    goodput = simulate(trace, GOODPUT, ENGINE, "free", SmartSpecCost())
    _assert_clean(goodput, trace)
    assert _mean_e2e(goodput) < 0.6 * _mean_e2e(none)
    assert goodput.budget_sum / goodput.budget_count > 4  # it speculated, and long


@pytest.mark.parametrize(("propose_fraction", "limit"), [(0.0, 1.01), (0.04, 1.06)])
def test_goodput_is_at_most_a_few_percent_worse_when_drafts_are_useless(
    propose_fraction: float, limit: float
) -> None:
    # alpha = 0 at a high rate. With a model-free drafter the goodput policy proposes every
    # step and prunes afterwards, so it pays whatever proposing costs (SmartSpec: 4%).
    trace = make_trace(
        _workload(0.0, {"uniform": [32, 128]}, {"uniform": [100, 600]}), 50, 150, 0, 0
    )
    cost = SmartSpecCost(propose_fraction=propose_fraction)
    none = simulate(trace, NONE, ENGINE, "free", cost)
    goodput = simulate(trace, GOODPUT, ENGINE, "free", cost)
    _assert_clean(goodput, trace)
    assert _mean_e2e(goodput) <= limit * _mean_e2e(none)


@pytest.mark.parametrize("drafter", ["free", "model"])
@pytest.mark.parametrize("policy", ["goodput", "smartspec_uniform", "fixed"])
def test_preemption_heavy_runs_finish_and_free_every_block(drafter: str, policy: str) -> None:
    engine = EngineSettings.from_flat(
        dict(max_num_seqs=32, max_num_batched_tokens=512, num_blocks=60, max_model_len=512)
    )
    trace = make_trace(_workload({"uniform": [0.3, 0.9]}, {"uniform": [20, 120]}), 20, 40, 2, 0)
    run = simulate(trace, PolicySpec(policy, policy, 4), engine, drafter, SmartSpecCost())
    _assert_clean(run, trace)
    assert run.num_preemptions > 0  # the point of this test: 60 blocks cannot hold them all


# ---- the drafter's work -----------------------------------------------------------------------


def test_model_drafter_counts_catch_up_rows_like_a_draft_model_with_its_own_cache() -> None:
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    r = Request("r", [5] * 10, params, frozenset(), 1000)
    r.num_computed_tokens = 10
    r.append_output_token(BONUS_TOKEN)  # root = position 10
    d = SimDrafter("model")
    (tree,) = d.propose([r], [3])
    assert tree.num_drafts == 3 and tree.is_chain
    # First sight: the whole context up to the root (11 rows), then 2 more drafts fed.
    assert (d.last_work.forwards, d.last_work.rows) == (3, 11 + 2)
    # One draft accepted + the correction: the cache is valid up to the accepted draft.
    for t in (DRAFT_TOKEN, BONUS_TOKEN):
        r.append_output_token(t)
    r.num_computed_tokens = 12
    d.propose([r], [3])
    assert d.last_work.rows == 1 + 2
    # All three accepted + the bonus: the third draft was never fed, so 2 rows of catch-up.
    for t in (DRAFT_TOKEN, DRAFT_TOKEN, DRAFT_TOKEN, BONUS_TOKEN):
        r.append_output_token(t)
    r.num_computed_tokens = 16
    d.propose([r], [2])
    assert (d.last_work.forwards, d.last_work.rows) == (2, 2 + 1)
    d.reset(["r"])  # preempted: from scratch
    d.propose([r], [1])
    assert d.last_work.rows == 17


# ---- reproducibility, config, plumbing --------------------------------------------------------

_TINY = {
    "name": "tiny",
    "rates": [1, 30],
    "num_requests": 12,
    "workload": {
        "prompt_len": {"uniform": [20, 200]},
        "output_len": {"uniform": [8, 40]},
        "acceptance": {"mixture": [{"weight": 1, "dist": 0.1}, {"weight": 2, "dist": 0.8}]},
    },
    "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512, "num_blocks": 2000},
    "speculation": {"num_speculative_tokens": 4},
    "policies": ["none", {"fixed": [2]}, "smartspec_uniform", "goodput"],
    "cost": {"kind": "smartspec", "noise": 0.05},
}
_WALL_KEYS = {"sim_wall_s", "sim_us_per_step", "policy_us_per_step"}


def _deterministic(results: dict) -> dict:
    return {
        w: {
            p: [{k: v for k, v in r.items() if k not in _WALL_KEYS} for r in runs]
            for p, runs in by_policy.items()
        }
        for w, by_policy in results.items()
    }


def test_identical_seeds_give_identical_results_and_other_seeds_do_not() -> None:
    config = parse_config(_TINY)
    first = _deterministic(run_config(config, log=lambda _: None))
    again = _deterministic(run_config(config, log=lambda _: None))
    other = _deterministic(run_config(config.with_overrides(seed=1), log=lambda _: None))
    assert first == again
    assert first != other


def test_config_rejects_typos_and_parses_policies() -> None:
    config = parse_config(_TINY)
    assert [p.label for p in config.policies] == [
        "none",
        "fixed-k2",
        "smartspec_uniform",
        "goodput",
    ]
    assert config.compare["fixed-k2"] == "ngram-k2" and config.compare["none"] == "no-spec"
    with pytest.raises(ValueError, match="unknown keys"):
        parse_config({**_TINY, "rate": [1]})
    with pytest.raises(ValueError, match="unknown policy"):
        parse_config({**_TINY, "policies": ["goodputt"]})
    with pytest.raises(ValueError, match="one per rate"):
        parse_config({**_TINY, "num_requests": [1, 2, 3]})


def test_distributions() -> None:
    rng = np.random.default_rng(0)
    lens = dists.draw({"uniform": [3, 5]}, 1000, rng, integer=True)
    assert set(lens.tolist()) == {3, 4, 5}
    mix = dists.draw(
        {"mixture": [{"weight": 3, "dist": 0.0}, {"weight": 1, "dist": 1.0}]}, 4000, rng, False
    )
    assert 0.2 < mix.mean() < 0.3
    prompts = dists.draw({"dataset": "repetitive"}, 50, rng, integer=True)
    assert prompts.min() > 10
    with pytest.raises(ValueError):
        dists.validate({"uniform": [5, 3]}, "x")


def test_coefficients_load_from_json_prometheus_and_sweep_runs(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(
        json.dumps({"placeholder": True, "coefficients": {"rows": 2.0}})
    )
    (tmp_path / "m.txt").write_text(
        "# HELP x\n"
        'specd:spec_decode_cost_model_coefficient{feature="intercept",model_name="m"} 0.5\n'
        'specd:spec_decode_cost_model_coefficient{feature="profile",model_name="m"} 0.1\n'
    )
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "metrics_timeline": [
                    {"t": 0, 'specd:spec_decode_cost_model_coefficient{feature="rows"}': 3.0}
                ]
            }
        )
    )
    assert load_coefficients(tmp_path / "c.json") == {"rows": 2.0}
    assert load_coefficients(tmp_path / "m.txt") == {"intercept": 0.5, "profile": 0.1}
    assert load_coefficients(tmp_path / "run.json") == {"rows": 3.0}
    # The profile indicator is not part of a real step's cost.
    cost = CoefficientCost(load_coefficients(tmp_path / "m.txt"))
    assert cost.seconds(StepShape(1, 1, 1, 1), proposed=0.0) == pytest.approx(0.5)


def test_coefficients_of_the_earlier_per_row_count_fit_still_replay(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text(
        'specd:spec_decode_cost_model_coefficient{feature="intercept",model_name="m"} 0.02\n'
        'specd:spec_decode_cost_model_coefficient{feature="rows",model_name="m"} 0.001\n'
        'specd:spec_decode_cost_model_coefficient{feature="rows_eq_3",model_name="m"} 0.005\n'
    )
    cost = CoefficientCost(load_coefficients(tmp_path / "m.txt"))
    assert cost.seconds(StepShape(2, 2, 2, 1), proposed=0.0) == pytest.approx(0.022)
    assert cost.seconds(StepShape(3, 3, 3, 1), proposed=0.0) == pytest.approx(0.028)
    (tmp_path / "bad.json").write_text(json.dumps({"coefficients": {"rows_eq_x": 1.0}}))
    with pytest.raises(ValueError, match="unknown cost features"):
        load_coefficients(tmp_path / "bad.json")


def test_compare_reports_relative_error_per_rate_and_policy(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "ngram-k2" / "mix" / "rate-1.0.json"
    run.parent.mkdir(parents=True)
    run.write_text(
        json.dumps(
            {
                "dataset_name": "mix",
                "request_rate": 1.0,
                "mean_e2el_ms": 1000.0,
                "mean_ttft_ms": 100.0,
            }
        )
    )
    sim = {
        "mix": {
            "fixed-k2": [
                {"request_rate": 1.0, "mean_e2el_ms": 1200.0, "mean_ttft_ms": 50.0},
                {"request_rate": 2.0, "mean_e2el_ms": 9.0},
            ]
        }
    }
    rows = compare(sim, load_sweep_runs(tmp_path), {"fixed-k2": "ngram-k2"})
    assert len(rows) == 1
    assert rows[0]["rel_error_e2el"] == pytest.approx(0.2)
    assert rows[0]["rel_error_ttft"] == pytest.approx(-0.5)
    assert rows[0]["rel_error_tpot"] is None


def test_cli_writes_json_png_markdown_and_comparison(tmp_path: Path) -> None:
    import yaml

    config = {**_TINY, "rates": [2], "num_requests": 6, "policies": ["none", "goodput"]}
    config["workloads"] = {"mix": {}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    report = tmp_path / "report"
    (report / "runs" / "goodput").mkdir(parents=True)
    (report / "runs" / "goodput" / "rate-2.0.json").write_text(
        json.dumps({"dataset_name": "mix", "request_rate": 2.0, "mean_e2el_ms": 500.0})
    )
    out = tmp_path / "out"
    assert (
        simulate_cli.main(["--config", str(path), "--out", str(out), "--compare", str(report)]) == 0
    )
    doc = json.loads((out / "tiny.json").read_text())
    runs = doc["results"]["mix"]["goodput"]
    assert [r["request_rate"] for r in runs] == [2.0] and runs[0]["completed"] == 6
    assert (out / "tiny.png").stat().st_size > 10_000
    assert "| 2.0 |" in (out / "tiny.md").read_text()
    rows = json.loads((out / "tiny-compare.json").read_text())["rows"]
    assert [(r["policy"], r["rate"]) for r in rows] == [("goodput", 2.0)]
    assert math.isfinite(rows[0]["rel_error_e2el"])


def test_cost_path_override_replaces_the_coefficients_and_needs_a_coefficient_cost(
    tmp_path: Path,
) -> None:
    slow, fast = tmp_path / "slow.json", tmp_path / "fast.json"
    slow.write_text(json.dumps({"coefficients": {"intercept": 0.2}}))
    fast.write_text(json.dumps({"coefficients": {"intercept": 0.01}}))
    raw = {
        **_TINY,
        "rates": [0.1],
        "num_requests": 1,  # alone: its E2E is its steps' summed cost
        "policies": ["none"],
        "cost": {"kind": "coefficients", "path": str(slow)},
    }
    config = parse_config(raw)
    slow_e2e = run_config(config, log=lambda _: None)
    fast_e2e = run_config(config.with_overrides(cost_path=str(fast)), log=lambda _: None)
    (w,) = slow_e2e
    ratio = slow_e2e[w]["none"][0]["mean_e2el_ms"] / fast_e2e[w]["none"][0]["mean_e2el_ms"]
    assert ratio == pytest.approx(20.0, rel=1e-6)  # every step costs its intercept alone
    with pytest.raises(ValueError, match="coefficients"):
        parse_config(_TINY).with_overrides(cost_path=str(fast))
