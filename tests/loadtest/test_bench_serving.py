"""loadtest.bench_serving end to end on the tiny random Llama: offline engine and a live
`specd serve`, every cell with both sides' numbers. A smoke test of the tool, not a measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest import bench_serving
from loadtest.bench_serving import Done, OfflineDriver, summarise
from server.engine.outputs import EngineCoreOutput
from server.engine.sampling_params import SamplingParams

# Engine settings both sides get: no start-up linear timing and a small KV cache keep it quick.
FAST = "--no-cpu-linear-plan --kv-cache-memory 64MiB --max-model-len 256"


def test_summarise_tpot_and_throughput() -> None:
    done = [Done(True, 0.1, 0.4, 4), Done(True, 0.2, 0.2, 1), Done(False, 0.0, 0.0, 0)]
    side = summarise(done, 2.0, None)
    assert (side.requests, side.failed, side.output_tokens) == (3, 1, 5)
    assert side.tokens_per_s == pytest.approx(2.5)
    # A one-token request has no TPOT: only the first request counts, (0.4 - 0.1) / 3.
    assert side.median_tpot_s == pytest.approx(0.1)
    assert side.median_ttft_s == pytest.approx(0.15)


class FakeCore:
    """One token per request per step, `max_tokens` steps each; rejects empty prompts."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.in_flight: list[int] = []  # requests in the engine at each step

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running)

    def add_request(
        self, rid: str, prompt: list[int], params: SamplingParams
    ) -> EngineCoreOutput | None:
        if not prompt:
            return EngineCoreOutput(rid, [], finish_reason="abort", error="empty")
        self.running[rid] = params.max_tokens or 1
        return None

    def step(self) -> list[EngineCoreOutput]:
        self.in_flight.append(len(self.running))
        outs = []
        for rid in list(self.running):
            self.running[rid] -= 1
            finished = self.running[rid] == 0
            if finished:
                del self.running[rid]
            outs.append(EngineCoreOutput(rid, [7], finish_reason="length" if finished else None))
        return outs


def test_offline_driver_closed_loop_keeps_n_in_flight() -> None:
    core = FakeCore()
    prompts = [[1], [], [2], [3], [4], [5]]  # the empty one is rejected: its slot refills
    done, seconds = OfflineDriver(core).run(  # type: ignore[arg-type]
        prompts, SamplingParams(max_tokens=3, ignore_eos=True), concurrency=2
    )
    assert [d.ok for d in done] == [True, False, True, True, True, True]
    assert all(d.tokens == 3 for d in done if d.ok) and seconds > 0
    # Two in the engine at every step until the last prompt is in, then the tail drains.
    assert core.in_flight == [2, 2, 2, 2, 2, 2, 1, 1, 1]


def test_offline_driver_open_loop_waits_for_arrivals() -> None:
    core = FakeCore()
    arrivals = [0.0, 0.05, 0.1]
    done, seconds = OfflineDriver(core).run(  # type: ignore[arg-type]
        [[1], [2], [3]], SamplingParams(max_tokens=2, ignore_eos=True), arrivals=arrivals
    )
    assert all(d.ok and d.tokens == 2 for d in done)
    # The last request could not start before it arrived.
    assert seconds >= arrivals[-1]


def test_serve_args_reach_both_sides() -> None:
    opts = bench_serving.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
         "--serve-arg=--max-num-seqs 5", "--server-arg=--no-enable-prefix-caching"]
    )  # fmt: skip
    args = bench_serving.serve_args_from(opts)
    assert args[-3:] == ["--max-num-seqs", "5", "--no-enable-prefix-caching"]
    engine = bench_serving.offline_config(args)
    assert engine.speculative.method == "ngram"
    assert engine.speculative.num_speculative_tokens == 2
    assert engine.scheduler.max_num_seqs == 5
    assert not engine.cache.enable_prefix_caching
    assert not engine.separate_process


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serving_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving"
    rc = bench_serving.main(
        ["--model", str(tiny_llama_dir), "--max-tokens", "4", "--requests-per-cell", "3",
         "--concurrency", "1", "2", "--warmup-requests", "2", f"--serve-arg={FAST}",
         "--startup-timeout", "180", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    (json_path,) = out.glob("*.json")
    result = json.loads(json_path.read_text())
    cells = result["cells"]
    assert [c["concurrency"] for c in cells] == [1, 2, None]
    assert cells[-1]["rate_req_s"] == pytest.approx(0.7 * result["saturation_req_s"], rel=1e-3)
    for cell in cells:
        for side in ("offline", "served"):
            s = cell[side]
            assert s["requests"] == 3 and s["failed"] == 0, (cell["cell"], side)
            # ignore_eos: both sides produce exactly max_tokens per request.
            assert s["output_lens"] == [4], (cell["cell"], side)
            assert s["tokens_per_s"] > 0 and s["median_ttft_s"] > 0
            assert not math.isnan(s["median_tpot_s"])
        assert cell["throughput_ratio"] > 0, cell["cell"]
        # >= 0, not > 0: the random model's tokens are often partial UTF-8 that the server
        # holds back, so a stream may carry all its text in one chunk (e2e == ttft, TPOT 0).
        assert cell["tpot_ratio"] >= 0, cell["cell"]
    assert result["machine"]["cores"] and result["loadavg_before"] is not None
    md = json_path.with_suffix(".md").read_text()
    assert result["command"] in md
    for cell in cells:
        row = next(line for line in md.splitlines() if line.startswith(f"| {cell['cell']} |"))
        assert f"{cell['throughput_ratio']:.3f}" in row and f"{cell['tpot_ratio']:.3f}" in row
    assert json_path.with_suffix(".png").stat().st_size > 0
