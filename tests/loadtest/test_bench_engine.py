"""loadtest.bench_engine on the tiny random Llama, fp32 and int4 taking turns: every table of
the report is written. A smoke test of the tool, not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench_engine


@pytest.mark.timeout(120)
def test_bench_engine_formats_side_by_side(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))  # the int4 entry
    out = tmp_path / "engine"
    rc = bench_engine.main(
        ["--model", str(tiny_llama_dir), "--batch-sizes", "1", "2", "--new-tokens", "4",
         "--repeats", "2", "--verify-rows", "3", "--verify-context", "16",
         "--verify-repeats", "1", "--no-cpu-linear-plan", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    (json_path,) = out.glob("*.json")
    result = json.loads(json_path.read_text())
    assert [f["quantization"] for f in result["formats"]] == ["none", "int4"]
    assert [f["label"] for f in result["formats"]] == ["fp32", "int4"]
    assert result["formats"][1]["int4_kernels"] in (["aten"], ["avx2"])
    for f in result["formats"]:
        assert [r["batch"] for r in f["throughput"]] == [1, 2]
        assert all(r["output_tokens"] == 4 * r["batch"] for r in f["throughput"])
        assert f["single_stream"]["tokens_per_s"] > 0
        assert len(f["single_stream"]["rounds"]) == 2
        assert [r["rows"] for r in f["verify_rows"]] == [1, 2, 3]
        assert all(r["step_ms"] > 0 for r in f["verify_rows"])
    assert result["transformers"]["tokens_per_s"] > 0
    int4 = result["comparison"]["against"]["int4"]
    assert set(int4["throughput_ratio"]) == {"1", "2"}
    assert set(int4["step_ms_ratio"]) == {"1", "2", "3"}
    assert int4["single_stream_target"] == 2.5
    assert len(int4["single_stream_round_ratios"]) == 2
    assert len(result["load_average"]["start"]) == 3

    (md_path,) = out.glob("*.md")
    md = md_path.read_text()
    assert "Load average (1, 5, 15 min) at start:" in md
    assert "; int4 kernel: " in md
    assert "## fp32 (--quantization none)" in md and "## int4 (--quantization int4)" in md
    assert md.count("| batch | output tokens | seconds | output tokens/s |") == 2
    assert "transformers generate" in md
    assert "| batch | fp32 tok/s | int4 tok/s | int4 / fp32 |" in md
    assert "Single-stream decode: int4" in md and "(target >= 2.5x:" in md
    assert "(round by round: " in md and "median of 2 rounds" in md
    assert "| rows | fp32 ms | fp32 ms/row | int4 ms | int4 ms/row | int4 / fp32 |" in md
    assert "\n| 3 | " in md
    (png,) = out.glob("*-verify-rows.png")
    assert png.stat().st_size > 0 and f"]({png.name})" in md


def test_formats_can_pin_the_int4_kernel() -> None:
    assert bench_engine.split_format("int4:aten") == ("int4", "aten")
    assert bench_engine.split_format("none") == ("none", None)
    with pytest.raises(SystemExit):
        bench_engine.main(["--quantization", "none:avx2"])
    with pytest.raises(SystemExit):
        bench_engine.main(["--quantization", "int4:fast"])


def test_formats_can_pin_the_attention_backend() -> None:
    assert bench_engine.split_format("int4:aten@cpu") == ("int4", "aten")
    assert bench_engine.split_backend("int4:aten@cpu") == "cpu"
    assert bench_engine.split_backend("none@torch") == "torch"
    assert bench_engine.split_backend("int4") is None
    with pytest.raises(SystemExit):
        bench_engine.main(["--quantization", "int4@flash"])


def test_formats_can_pin_the_kernel_threads() -> None:
    assert bench_engine.split_threads("int4:avx2@cpu/1") == 1
    assert bench_engine.split_format("int4:avx2@cpu/1") == ("int4", "avx2")
    assert bench_engine.split_backend("int4:avx2@cpu/1") == "cpu"
    assert bench_engine.split_backend("none/2") is None
    assert bench_engine.split_threads("int4") is None
    with pytest.raises(SystemExit):
        bench_engine.main(["--quantization", "int4/0"])
    with pytest.raises(SystemExit):
        bench_engine.main(["--quantization", "int4/x"])


def test_formats_take_turns_in_rotated_order() -> None:
    built = [bench_engine._Built(spec, None, spec, [], 0.0, 1) for spec in ("a", "b", "c")]  # type: ignore[arg-type]
    orders = ["".join(b.spec for b in bench_engine._rotated(built, turn)) for turn in range(4)]
    assert orders == ["abc", "bca", "cab", "abc"]
