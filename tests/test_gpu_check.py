"""`make gpu-check` (kernels/gpu_check/) runs on a lent GPU only now and then: its dry run
here, on every change, keeps each stage's code path from rotting in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels.gpu_check.environment import nominal_hbm_tbps
from kernels.gpu_check.kernel_stages import _bench_rows, _pytest_summary
from kernels.gpu_check.plan import make_plan
from kernels.gpu_check.report import default_out
from kernels.gpu_check.stages import Deadline, StageResult, StageTimeout, hard_limit, run_stage

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "environment",
    "kernel-tests",
    "kernel-bench",
    "engine-decode",
    "engine-verify",
    "int4-linear",
    "int4-engine",
    "greedy-identity",
    "bf16-greedy",
    "int4-greedy",
]


def test_dry_run_writes_every_stage_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu" / "dry.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.gpu_check", "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# gpu-check on cpu")
    assert "- device: cpu" in text and "- versions: python" in text
    for stage in STAGES:
        assert f"## {stage}: " in text, stage

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["meta"]["dry_run"] and report["meta"]["complete"]
    assert report["meta"]["environment"]["torch"]
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert list(status) == STAGES
    assert "fail" not in status.values(), report["stages"]
    # The stages that can run on CPU did; the two that need CUDA said why they did not.
    for stage in STAGES:
        if stage not in ("kernel-tests", "kernel-bench"):
            assert status[stage] == "pass", stage
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["kernel-tests"]["reason"] and stages["kernel-bench"]["reason"]
    plan = report["meta"]["plan"]
    decode = stages["engine-decode"]["data"]["rows"]
    assert [r["batch"] for r in decode] == list(plan["decode_batches"])
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in decode)
    verify = stages["engine-verify"]["data"]["rows"]
    assert {r["draft_rows"] for r in verify} == set(plan["draft_rows"])
    assert {r["shape"] for r in verify} == {"chain", "tree"}
    identity = stages["greedy-identity"]["data"]
    assert identity["identical"] and identity["drafted"] > 0
    # int4 (the CPU kernel here, tinygemm on CUDA): within the head's error bound, rows
    # computed alike whatever their count, the engine beside the dense one, lossless.
    linear = stages["int4-linear"]["data"]
    assert 0 < linear["worst_err_over_bound"] <= 1
    assert all(r["row_invariant"] for r in linear["rows"] if r["rows"] <= 64)
    assert {r["rows"] for r in linear["rows"]} == {1, 8, 32, 64, 512}
    engine = stages["int4-engine"]["data"]["rows"]
    assert [r["batch"] for r in engine] == list(plan["decode_batches"])
    # int4 reads fewer bytes of weights, so its floor is lower than the dense model's.
    assert all(0 < r["int4_floor_ms"] < r["dense_floor_ms"] for r in engine)
    for stage in ("bf16-greedy", "int4-greedy"):  # float32 on CPU: identical
        identity = stages[stage]["data"]
        assert identity["identical"] and identity["drafted"] > 0, stage
    assert "int4" in stages["int4-greedy"]["data"]["model"]


def test_only_runs_the_named_stages_after_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "only.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.gpu_check", "--dry-run", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--only", "int4-linear"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["name"] for s in report["stages"]] == ["environment", "int4-linear"]
    bad = subprocess.run([*cmd, "--only", "nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def test_pytest_summary_and_bench_rows_parse_real_output() -> None:
    assert _pytest_summary("....\n46 passed, 2 skipped in 31.2s\n") == {
        "passed": 46,
        "skipped": 2,
    }
    assert _pytest_summary("F.\n1 failed, 1 passed, 1 error in 2s") == {
        "failed": 1,
        "passed": 1,
        "error": 1,
    }
    out = "noise\n{'batch': 1, 'prefix': 512, 'tree_nodes': 1, 'kernel_us': 9.5}\n{'bad'\n"
    assert _bench_rows(out) == [{"batch": 1, "prefix": 512, "tree_nodes": 1, "kernel_us": 9.5}]


def test_results_land_under_out_with_a_name_the_device_tool_brings_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    plan = make_plan(dry_run=False)
    path = default_out(plan, "NVIDIA H100 80GB HBM3", "2026-12-02")
    assert path == tmp_path / "2026-12-02-nvidia-h100-80gb-hbm3.md"
    monkeypatch.delenv("OUT")
    path = default_out(plan, "NVIDIA H200", "2026-12-02")
    assert path == REPO / "loadtest" / "results" / "gpu" / "2026-12-02-nvidia-h200.md"
    # The dry run never writes into the repository.
    dry = default_out(make_plan(dry_run=True), "cpu", "2026-12-02")
    assert REPO not in dry.parents


def test_the_real_plan_fits_eight_minutes_and_an_8b_shape() -> None:
    plan = make_plan(dry_run=False)
    assert sum(plan.budgets.values()) <= 8 * 60 - 30
    assert plan.model["hidden_size"] == 4096 and plan.model["num_hidden_layers"] == 32
    assert plan.decode_batches == (1, 8, 32, 64) and max(plan.draft_rows) == 64
    assert nominal_hbm_tbps("NVIDIA H100 80GB HBM3") == 3.35
    assert nominal_hbm_tbps("NVIDIA H200") == 4.8


def test_a_stage_that_raises_or_hangs_is_recorded_and_the_run_goes_on() -> None:
    def boom(result: StageResult, deadline: Deadline) -> None:
        raise RuntimeError("kernel exploded")

    r = run_stage(StageResult("x", "correctness"), 5, boom)
    assert r.status == "fail" and "kernel exploded" in r.reason and r.budget_s == 5
    with pytest.raises(StageTimeout), hard_limit(0.05):
        time.sleep(2)
