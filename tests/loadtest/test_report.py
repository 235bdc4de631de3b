"""report.md, sweep.json and plots from hand-made results (the live sweep test covers the
real path)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loadtest.cli import build_parser
from loadtest.host import cpu_simd, loadavg, machine_info
from loadtest.metrics import result_json, summarize
from loadtest.records import RequestRecord, Sample
from loadtest.report import SweepOutcome, write_report
from loadtest.sweep_config import parse_sweep, resolve

POLICY_ROWS = [
    {"t": 1.0, "acceptance_rate": 0.4, "budget_mean": 3.0, "predicted_step_ms": 40.0,
     "measured_step_ms": 45.0, "estimated_goodput_tok_s": 90.0},
    {"t": 2.0, "acceptance_rate": 0.6, "budget_mean": 5.0, "predicted_step_ms": 50.0,
     "measured_step_ms": 48.0, "estimated_goodput_tok_s": 95.0},
]  # fmt: skip


def _result(rate: float, ttft: float, policy: bool) -> dict:
    # Latencies 1.1, 1.2, 1.3 and 2.4 s past TTFT: mean and p99 differ.
    recs = [
        RequestRecord(
            index=i,
            success=True,
            ttft=ttft,
            latency=ttft + extra,
            output_len=11,
            prompt_len=20,
            itl=[0.1] * 10,
            start_time=i / rate,
        )
        for i, extra in enumerate((1.1, 1.2, 1.3, 2.4))
    ]
    out = result_json(summarize(recs, 4 / rate + 1), recs, {"request_rate": rate})
    out["loadavg_before"], out["loadavg_after"] = 0.3, 1.7
    if policy:
        out["spec_decode"] = {"acceptance_rate": 0.5, "mean_acceptance_length": 2.5,
                              "budget_mean": 4.25, "predicted_step_ms": 45.0,
                              "measured_step_ms": 47.0}  # fmt: skip
        out["metrics_timeline"] = POLICY_ROWS
    return out


def _sweep(data: dict, *flags: str):
    conf = {"configurations": [{"name": "a", "base_url": "http://127.0.0.1:1"},
                               {"name": "b", "serve_args": ["--model", "m"]}]}  # fmt: skip
    args = build_parser().parse_args(["sweep", "--config", "x", "--goodput", "ttft:500", *flags])
    return resolve(parse_sweep({"name": "hand", "rates": [1, 2], **conf, **data}, "hand"), args)


def test_report_tables_plots_and_provenance(tmp_path: Path) -> None:
    sweep, args = _sweep({"dataset_name": "chat"})
    outcome = SweepOutcome(time.time(), (0.22, 0.31, 0.4), {"chat": [Sample("p", 1, 1)] * 4})
    outcome.results = {"chat": {"a": [_result(1.0, 0.2, True), _result(2.0, 0.4, True)]}}
    outcome.failures = {"b": "server exited with code 1 before /health; log tail:\nValueError: x"}
    outcome.launched = {"a": "already running"}
    text = write_report(tmp_path, sweep, args, outcome).read_text()
    assert "| TTFT mean | TTFT p99 | TPOT mean | TPOT p99 | E2EL mean | E2EL p99 |" in text
    # rate 1: TTFT 200 ms; TPOT = extra / 10; E2EL mean 1700 ms, p99 ~2567 ms.
    assert "| a | 1.0 | 4/0 | 0.80 | 8.8 | - | 200 | 200 | 150 | 237 | 1700 | 2567 |" in text
    assert "| 0.50 | 2.50 | 4.25 | 45/47 | 0.3/1.7 |" in text
    assert "**failed**: server exited with code 1" in text and "ValueError: x" in text
    assert "git commit:" in text and "machine:" in text and "command:" in text
    assert "load average at start 0.22 0.31 0.40 (before the first server started)" in text
    assert "prompt uniqueness: `per_rate_prefix`" in text
    for png in ("latency", "throughput", "acceptance", "policy"):
        assert (tmp_path / "plots" / f"{png}.png").stat().st_size > 5_000
        assert f"](plots/{png}.png)" in text
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["machine"]["loadavg_at_start"] == [0.22, 0.31, 0.4]
    assert meta["prompt_uniqueness"] == "per_rate_prefix" and meta["datasets"] == ["chat"]
    assert meta["summary"]["chat"]["a"][1]["request_rate"] == 2.0


def test_report_per_dataset_sections_and_policy_plots(tmp_path: Path) -> None:
    sweep, args = _sweep({"datasets": ["mix", "repetitive"], "prompt_uniqueness": "none"})
    outcome = SweepOutcome(time.time(), None, {"mix": [], "repetitive": []})
    # `a` exports the policy series on mix only; `b` (say, a peer) never does.
    outcome.results = {
        "mix": {"a": [_result(1.0, 0.2, True)], "b": [_result(1.0, 0.3, False)]},
        "repetitive": {"a": [_result(1.0, 0.1, False)], "b": [_result(1.0, 0.5, False)]},
    }
    text = write_report(tmp_path, sweep, args, outcome).read_text()
    mix, rep = text.index("### Dataset `mix`"), text.index("### Dataset `repetitive`")
    assert mix < rep
    assert "| b | 1.0 | 4/0 |" in text[mix:rep] and "| b | 1.0 | 4/0 |" in text[rep:]
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"latency-mix.png", "latency-repetitive.png", "throughput-repetitive.png",
            "policy-mix.png", "acceptance-mix.png"} <= plots  # fmt: skip
    # No server exported the policy series on repetitive: no plot, and the report says so.
    assert "policy-repetitive.png" not in plots and "acceptance-repetitive.png" not in plots
    assert "No server exported the series for" in text[rep:]
    assert "prompt uniqueness: `none`" in text and "load average at start unknown" in text
    assert "runs/<config>/<dataset>/rate-<r>.json" in text
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert set(meta["summary"]) == {"mix", "repetitive"} and meta["prompt_uniqueness"] == "none"


def test_machine_info_and_loadavg() -> None:
    info = machine_info()
    assert info["usable_cores"] >= 1 and info["memory_gib"] > 0 and info["cpu_model"]
    la = loadavg()
    assert la is not None and len(la) == 3 and all(x >= 0 for x in la)


def test_reports_name_the_widest_simd_extension() -> None:
    """Two "AMD EPYC" machines ran int4 decode 34 and 48 ms a step: the one without
    AVX-512 is slower, and a report must say which it ran on."""
    assert cpu_simd("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n") == "AVX2"
    assert cpu_simd("flags\t: avx avx2 avx512f avx512bw\n") == "AVX-512"
    assert cpu_simd("Features\t: fp asimd evtstrm\n") == "NEON"
    assert cpu_simd("") == "unknown"
    assert machine_info()["cpu_simd"] in {"AVX-512", "AVX2", "AVX", "NEON", "unknown"}
