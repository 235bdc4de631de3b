"""report.md and plots from hand-made results (the live sweep test covers the real path)."""

from __future__ import annotations

import time
from pathlib import Path

from loadtest.cli import build_parser
from loadtest.metrics import result_json, summarize
from loadtest.records import RequestRecord, Sample
from loadtest.report import machine_info, write_report
from loadtest.sweep import parse_sweep


def _result(rate: float, ttft: float, budget: float) -> dict:
    recs = [
        RequestRecord(
            index=i,
            success=True,
            ttft=ttft,
            latency=ttft + 1.0,
            output_len=11,
            prompt_len=20,
            itl=[0.1] * 10,
            start_time=i / rate,
        )
        for i in range(4)
    ]
    out = result_json(summarize(recs, 4 / rate + 1), recs, {"request_rate": rate})
    out["spec_decode"] = {"acceptance_rate": 0.5, "mean_acceptance_length": 2.5}
    out["metrics_timeline"] = [
        {"t": 1.0, "acceptance_rate": 0.4, "specd:spec_decode_budget": budget},
        {"t": 2.0, "acceptance_rate": 0.6, "specd:spec_decode_budget": budget + 1},
    ]
    return out


def test_report_tables_plots_and_provenance(tmp_path: Path) -> None:
    sweep = parse_sweep({"name": "hand", "rates": [1, 2], "configurations": [
        {"name": "a", "base_url": "http://127.0.0.1:1"},
        {"name": "b", "serve_args": ["--model", "m"]}]}, "hand")  # fmt: skip
    args = build_parser().parse_args(["sweep", "--config", "x", "--goodput", "ttft:500"])
    args.endpoint = "/v1/completions"
    results = {"a": [_result(1.0, 0.2, 3), _result(2.0, 0.4, 2)]}
    failures = {"b": "server exited with code 1 before /health; log tail:\nValueError: bad"}
    path = write_report(tmp_path, sweep, args, results, failures, {"a": "already running"},
                        time.time(), [Sample("p", 1, 1)])  # fmt: skip
    text = path.read_text()
    assert "| a | 1.0 | 4/0 |" in text and "| a | 2.0 | 4/0 |" in text
    assert "0.50 | 2.50 |" in text  # acceptance and mean acceptance length columns
    assert "**failed**: server exited with code 1" in text and "ValueError: bad" in text
    assert "git commit:" in text and "machine:" in text and "command:" in text
    for png in ("latency", "throughput", "spec_timeline"):
        assert (tmp_path / "plots" / f"{png}.png").stat().st_size > 5_000
    assert (tmp_path / "sweep.json").exists()


def test_machine_info() -> None:
    info = machine_info()
    assert info["usable_cores"] >= 1 and info["memory_gib"] > 0 and info["cpu_model"]
