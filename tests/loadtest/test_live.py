"""The load generator against a live `specd serve` (tiny random Llama): no mocked server.

Bounded: a handful of requests of a few tokens each, one server for the module plus one that
the sweep test starts itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.bench import ReportConfig, benchmark
from loadtest.client import ApiConfig
from loadtest.records import Sample
from loadtest.runner import RunConfig
from loadtest.server_proc import ServerProcess, free_port, specd_argv

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(
        not (REPO_ROOT / "server" / "cli.py").exists(),
        reason="server/cli.py does not exist yet: no specd server to test against",
    ),
    pytest.mark.timeout(600),
]
MAX_MODEL_LEN = 256
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Paged attention stores keys",
    "One two three four five",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("lt-tiny") / "llama")


def _serve_args(model: Path) -> list[str]:
    return ["--model", str(model), "--max-model-len", str(MAX_MODEL_LEN)]


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("lt-logs") / "server.log"
    with ServerProcess(specd_argv(_serve_args(tiny_dir), port), port, log) as proc:
        yield proc


def _api(server: ServerProcess, endpoint: str = "/v1/completions") -> ApiConfig:
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    return ApiConfig(server.base_url, endpoint, model, ignore_eos=True, request_timeout_s=120)


def _run(api: ApiConfig, samples: list[Sample], **kw: object):
    cfg = RunConfig(api, progress=False, **kw)  # type: ignore[arg-type]
    return asyncio.run(benchmark(cfg, samples, ReportConfig(slos={"ttft": 60_000})))


def test_token_counts_agree_with_server(server: ServerProcess) -> None:
    api = _api(server)
    samples = [Sample(p, 0, 12) for p in PROMPTS]
    res = _run(api, samples, max_concurrency=1)
    assert res.summary.completed == len(PROMPTS) and res.summary.failed == 0
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for rec, prompt in zip(res.output.records, PROMPTS, strict=True):
            assert rec.token_source == "usage" and rec.output_len == 12
            count = http.post("/tokenize", json={"model": api.model, "prompt": prompt}).json()
            assert rec.prompt_len == count["count"]
            body = {"model": api.model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            full = http.post("/v1/completions", json=body).json()
            assert full["usage"]["completion_tokens"] == rec.output_len
            assert full["usage"]["prompt_tokens"] == rec.prompt_len
            assert full["choices"][0]["text"] == rec.generated_text
            assert rec.ttft > 0 and rec.latency >= rec.ttft
            assert len(rec.itl) == rec.num_chunks - 1
    assert res.result["total_output_tokens"] == 12 * len(PROMPTS)


def test_failed_request_is_an_error_not_the_end(server: ServerProcess) -> None:
    samples = [Sample(p, 0, 6) for p in PROMPTS]
    samples.insert(1, Sample("too many tokens asked for", 0, MAX_MODEL_LEN * 40))
    res = _run(_api(server), samples)
    assert res.summary.completed == len(PROMPTS) and res.summary.failed == 1
    bad = res.output.records[1]
    assert not bad.success and bad.status_code == 400 and bad.error.startswith("HTTP 400")
    assert res.result["errors"][1] == bad.error and res.result["output_lens"][1] == 0
    assert all(r.success for i, r in enumerate(res.output.records) if i != 1)


def test_duration_cap_stops_sending(server: ServerProcess) -> None:
    samples = [Sample(p, 0, 4) for p in PROMPTS] * 5  # 20 at 4 req/s: ~5 s uncapped
    res = _run(_api(server), samples, request_rate=4.0, duration_s=1.0, drain_timeout_s=60.0)
    sent = len(res.output.records)
    assert 1 <= sent < len(samples) and res.output.not_sent == len(samples) - sent
    assert res.summary.failed == 0 and res.result["not_sent"] == res.output.not_sent
    assert max(r.start_time for r in res.output.records) < 1.0


def test_chat_endpoint_streams(server: ServerProcess) -> None:
    res = _run(_api(server, "/v1/chat/completions"), [Sample(PROMPTS[0], 0, 5)] * 2,
               request_rate=20.0)  # fmt: skip
    assert res.summary.completed == 2
    assert all(r.output_len == 5 and r.token_source == "usage" for r in res.output.records)


def test_cli_run_writes_result_file(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "loadtest", "run", "--base-url", server.base_url,
           "--dataset-name", "chat", "--num-prompts", "3", "--max-tokens", "4", "--ignore-eos",
           "--request-rate", "10", "--burstiness", "0.5", "--goodput", "ttft:60000",
           "--metric-percentiles", "50,99", "--disable-tqdm",
           "--result-file", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["total_output_tokens"] == 12
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    for key in ("p50_ttft_ms", "p99_e2el_ms", "median_itl_ms", "std_tpot_ms", "itls"):
        assert key in result
    assert result["loadavg_before"] >= 0 and result["loadavg_after"] >= 0


def _sweep(
    tiny_dir: Path,
    tmp_path: Path,
    workload: str,
    names: tuple[str, ...] = ("plain",),
    rates: str = "[inf, 5]",
) -> tuple[Path, str]:
    """Runs a sweep of the tiny model; returns the report folder and the sweep's stdout."""
    config = tmp_path / "tiny.yaml"
    args = json.dumps(_serve_args(tiny_dir))  # JSON is YAML
    config.write_text(
        f"name: tiny\nnum_prompts: 3\nmax_tokens: 4\nignore_eos: true\n{workload}"
        f"rates: {rates}\nwarmup_prompts: 1\nconfigurations:\n"
        + "".join(f"  - name: {n}\n    serve_args: {args}\n" for n in names)
    )
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "loadtest", "sweep", "--config", str(config),
           "--output-dir", str(out), "--disable-tqdm"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, done.stdout


def _cache_hits(run: dict) -> float:
    delta = run["metrics_delta"]
    assert delta["specd:prefix_cache_queries_total"] > 0  # the server does look prompts up
    return delta.get("specd:prefix_cache_hits_total", 0.0)  # zero deltas are left out


def test_sweep_over_two_datasets_sends_prompts_new_to_the_server(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """One server, two datasets, two rates: every run's prompts start with their own prefix,
    so the prefix cache serves none of them (random prompts repeat across rates, chat ones
    too)."""
    out, _ = _sweep(tiny_dir, tmp_path, "datasets: [chat, random]\nrandom_input_len: 20\n")
    report = (out / "report.md").read_text()
    assert report.index("### Dataset `chat`") < report.index("### Dataset `random`")
    assert report.count("| plain | inf | 3/0 |") == 2 and report.count("| plain | 5.0 | 3/0 |") == 2
    assert "prompt uniqueness: `per_rate_prefix`" in report
    for png in ("latency-chat", "latency-random", "throughput-random"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 10_000
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["datasets"] == ["chat", "random"] and meta["prompt_uniqueness"] == "per_rate_prefix"
    assert len(meta["machine"]["loadavg_at_start"]) == 3
    for dataset in ("chat", "random"):
        for rate_index, rate in enumerate(("inf", "5.0")):
            run = json.loads((out / "runs" / "plain" / dataset / f"rate-{rate}.json").read_text())
            assert run["completed"] == 3 and run["dataset_name"] == dataset
            assert run["prompt_prefixes"][2] == f"[run r{rate_index}-2 {dataset}] "
            assert run["loadavg_before"] is not None and run["loadavg_after"] is not None
            assert _cache_hits(run) == 0, (dataset, rate)


def test_sweep_without_prefixes_replays_cached_prompts(tiny_dir: Path, tmp_path: Path) -> None:
    """The control: with prompt_uniqueness none the second rate finds the first's prompts in
    the prefix cache. Also the one-dataset layout: runs/<config>/rate-<r>.json."""
    out, _ = _sweep(tiny_dir, tmp_path, "dataset_name: chat\nprompt_uniqueness: none\n")
    report = (out / "report.md").read_text()
    assert "| plain | inf | 3/0 |" in report and "| plain | 5.0 | 3/0 |" in report
    assert "git commit:" in report and "machine:" in report
    assert "prompt uniqueness: `none`" in report
    assert (out / "plots" / "latency.png").stat().st_size > 10_000
    assert (out / "plots" / "throughput.png").exists()
    second = json.loads((out / "runs" / "plain" / "rate-5.0.json").read_text())
    assert second["completed"] == 3 and second["prompt_prefixes"] == ["", "", ""]
    assert _cache_hits(second) > 0


def test_interleaved_sweep_runs_rounds_over_servers_that_are_all_up(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Two servers up at once, two repeats of one rate: the runs go a, b then b, a (each
    configuration first once), every repeat has prompts of its own, and the report folds
    the repeats into medians."""
    out, stdout = _sweep(
        tiny_dir,
        tmp_path,
        "dataset_name: chat\nrepeats: 2\nschedule: interleaved\n",
        names=("a", "b"),
        rates="[inf]",
    )
    titles = re.findall(r"^\[(\w) / chat @ inf req/s \(repeat (\d)/2\)\] 3 prompts", stdout, re.M)
    assert titles == [("a", "1"), ("b", "1"), ("b", "2"), ("a", "2")]
    # Both servers were started before the first measured run.
    assert stdout.index("[b] starting") < stdout.index("[a / chat @ inf")
    report = (out / "report.md").read_text()
    assert "schedule `interleaved`" in report and "2 runs per configuration" in report
    assert re.search(r"\| a \| inf \| 2 \| [\d.]+ \| [\d.]+-[\d.]+ \| \d+% \|", report)
    assert report.count("| a | inf | 1 | 3/0 |") == 1 and report.count("| a | inf | 2 | 3/0 |") == 1
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["repeats"] == 2 and meta["schedule"] == "interleaved"
    for name in ("a", "b"):
        assert (out / "metrics" / f"{name}.prom").stat().st_size > 0
        for repeat in range(2):
            run = json.loads((out / "runs" / name / f"rate-inf-rep{repeat}.json").read_text())
            assert run["completed"] == 3 and run["repeat"] == repeat
            label = "r0" if repeat == 0 else "r0.1"
            assert run["prompt_prefixes"][1] == f"[run {label}-1 chat] "
            assert _cache_hits(run) == 0
