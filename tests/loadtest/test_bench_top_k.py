"""bench_top_k end to end on a small vocabulary: both forms timed, the report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_top_k
from server.model import top_k_cpu


@pytest.mark.skipif(top_k_cpu.load() is None, reason="no AVX2 top-k kernel here")
def test_bench_top_k_writes_both_forms_per_row_count(tmp_path: Path) -> None:
    args = ["--rows", "1", "3", "--vocab", "100", "--rounds", "2", "--out", str(tmp_path)]
    assert bench_top_k.main(args) == 0
    result = json.loads((tmp_path / "top-k.json").read_text())
    assert [r["rows"] for r in result["rows"]] == [1, 3]
    assert all(set(r["ms"]) == {"torch topk + logsumexp", "specd kernel"} for r in result["rows"])
    report = (tmp_path / "top-k.md").read_text()
    assert "| 3 |" in report and "speed-up" in report
