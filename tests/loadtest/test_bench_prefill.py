"""loadtest.bench_prefill compares like with like: the served pieces and the one causal call
compute the same attention, and the report has a row per length. A smoke test of the tool,
not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loadtest import bench_prefill


@pytest.mark.parametrize("length", [1, 16, 37, 80])
def test_pieces_and_one_call_compute_the_same_attention(length: int) -> None:
    case = bench_prefill.AttentionCase(length, layers=2, q_heads=6, kv_heads=2, head_dim=8)
    torch.testing.assert_close(case.pieces(), case.one_call(), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_bench_prefill_writes_a_row_per_length(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "engine"
    rc = bench_prefill.main(
        ["--model", str(tiny_llama_dir), "--lengths", "16", "40", "--repeats", "1",
         "--no-cpu-linear-plan", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((out / "prefill.json").read_text())
    assert [r["length"] for r in result["rows"]] == [16, 40]
    for r in result["rows"]:
        assert r["attention_pieces_ms"] > 0 and r["attention_one_call_ms"] > 0
        assert r["prefill_ms"] > 0
        assert r["max_abs_diff"] < 1e-4
    report = (out / "prefill.md").read_text()
    assert "| 40 |" in report and "extra share of prefill" in report
