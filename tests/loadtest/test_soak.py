"""The soak: its analysis on synthetic records, and a short real soak against a live server."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtest import soak
from loadtest.soak_load import (
    DONE,
    EXPECTED,
    INCOMPLETE,
    KINDS,
    OK,
    PROMPT_CHARS,
    TRANSPORT,
    UNEXPECTED_STATUS,
    KindPicker,
    PromptSource,
    Record,
    check_completion,
    check_refusal,
    check_stream,
)
from loadtest.soak_report import (
    MIB,
    latency_windows,
    memory_growth,
    p99_drift,
    percentile,
    plot,
    render_markdown,
    summarize,
    tally,
)

# --- analysis ----------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def _records(duration: float = 100.0) -> list[Record]:
    """One OK chat a second whose latency doubles from the first half to the second, plus a
    slow cancelled stream and a bad request each 10 s (which must not count in latencies)."""
    out = []
    for i in range(int(duration)):
        out.append(
            Record(t=i + 0.5, kind="chat", latency_s=1.0 if i < 50 else 2.0, status=200, outcome=OK)
        )
        if i % 10 == 0:
            out.append(Record(t=i + 0.1, kind="cancel", latency_s=50.0, status=200, outcome=OK))
            out.append(Record(t=i + 0.2, kind="bad", latency_s=40.0, status=400, outcome=EXPECTED))
    return out


def test_latency_windows_and_drift() -> None:
    records = _records()
    # A failure in window 3, and a request started after the deadline: both in the tally.
    records.append(
        Record(t=25.0, kind="chat", latency_s=99.0, status=500, outcome=UNEXPECTED_STATUS)
    )
    records.append(Record(t=100.5, kind="completion", latency_s=2.0, status=200, outcome=OK))
    windows = latency_windows(records, duration_s=100.0, n_windows=10)
    assert len(windows) == 10
    assert [w["start_s"] for w in windows] == [10.0 * i for i in range(10)]
    assert windows[0]["requests"] == 12 and windows[0]["latency_requests"] == 10
    assert windows[0]["p99_s"] == pytest.approx(1.0)  # the 50 s cancellation is left out
    assert windows[2]["unexpected_errors"] == 1 and windows[2]["p99_s"] == pytest.approx(1.0)
    assert windows[9]["latency_requests"] == 11 and windows[9]["p50_s"] == pytest.approx(2.0)
    assert p99_drift(windows) == pytest.approx(2.0)
    assert p99_drift(windows[:1]) is None


def test_memory_growth_skips_the_warm_up() -> None:
    # Every 5 s over 100 s: a warm-up climb to 500 MiB in the first 10 s, then 1 MiB a sample.
    samples = [{"t": 5.0 * i, "rss_bytes": (100 + 40 * i) * MIB} for i in range(2)]
    samples += [{"t": 5.0 * i, "rss_bytes": (500 + i) * MIB} for i in range(2, 21)]
    samples.append({"t": 101.0, "rss_bytes": 10_000 * MIB})  # after the load: not counted
    samples.append({"t": 50.0, "rss_bytes": None})  # a failed read
    mem = memory_growth(samples, duration_s=100.0)
    assert mem["warmup_s"] == 10.0 and mem["samples"] == 19
    assert mem["edge_samples"] == 4  # round(0.2 * 19)
    assert mem["start_median_bytes"] == int(503.5 * MIB)  # samples 2..5
    assert mem["end_median_bytes"] == int(518.5 * MIB)  # samples 17..20
    assert mem["growth_bytes"] == 15 * MIB
    assert mem["growth_pct"] == pytest.approx(100 * 15 / 503.5, abs=0.01)
    assert memory_growth(samples[:3], duration_s=100.0)["growth_bytes"] is None


def test_tally_counts_outcomes_by_kind() -> None:
    records = [
        Record(0.0, "chat", 1.0, 200, OK),
        Record(1.0, "bad", 0.1, 404, EXPECTED, "unknown model: HTTP 404"),
        Record(2.0, "chat_stream", 1.0, 200, INCOMPLETE, "no [DONE]"),
        Record(3.0, "n2", 120.0, None, TRANSPORT, "no answer within 120 s"),
    ]
    t = tally(records)
    assert t["requests"] == 4
    assert set(t["by_kind"]) == set(KINDS)
    assert t["by_kind"]["chat"][OK] == 1 and t["by_kind"]["cancel"][OK] == 0
    assert t["errors"] == {EXPECTED: 1, UNEXPECTED_STATUS: 0, TRANSPORT: 1, INCOMPLETE: 1}
    assert t["unexpected_errors"] == 2
    assert len(t["unexpected_examples"]) == 2 and "no [DONE]" in t["unexpected_examples"][0]


def _result(records: list[Record], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A soak.json-shaped dict, as soak.main assembles it."""
    summary = summarize(records, samples, duration_s=100.0)
    return {
        "command": "python -m loadtest.soak --duration 100",
        "config": {
            "model": "tiny",
            "duration_s": 100.0,
            "concurrency": 2,
            "serve_args": ["--model", "tiny", "--speculative-config", '{"a": 1}'],
        },
        "machine": {
            "cpu": "CPU",
            "cores": "2",
            "torch": "2",
            "git_commit": "abc",
            "date": "2026-01-01 00:00 UTC",
        },
        "loadavg_at_start": "0.10 0.20 0.30",
        "loadavg_at_end": "1.00 1.00 1.00",
        "elapsed_s": 120.0,
        "server_exit_code": 0,
        "leaked_blocks": 0,
        "idle_reached": True,
        "idle_wait_s": 0.5,
        "spec_decode": {"draft_tokens": 100.0, "accepted_tokens": 40.0, "acceptance": 0.4},
        **summary,
        "passed": summary["unexpected_errors"] == 0,
        "samples": samples,
        "final": {"t": 101.0, "kv_used": 0.0, "rejected": {"invalid_request": 10.0}},
    }


def test_markdown_and_plot(tmp_path: Path) -> None:
    samples = [
        {"t": 5.0 * i, "rss_bytes": (500 + i) * MIB, "kv_used": i % 7, "kv_total": 4096}
        for i in range(21)
    ]
    result = _result(_records(), samples)
    md = render_markdown(result)
    assert "Result: **PASS** (0 leaked KV blocks, 0 unexpected errors)" in md
    assert "Command: `python -m loadtest.soak --duration 100`" in md
    assert "growth **+15.0 MiB**" in md
    assert "p99 drift (last window / first window): **2.00x**" in md
    assert """--speculative-config '{"a": 1}'""" in md
    assert "100 draft tokens proposed, 40 accepted (0.40)" in md
    assert "rejected, by reason: invalid_request 10." in md
    assert "| chat | 100 | 100 | 0 |" in md
    png = plot(result, tmp_path / "soak.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- request checks, kinds, prompts ------------------------------------------------------


def _usage(tokens: int, n: int = 1) -> dict[str, Any]:
    return {"choices": [{}] * n, "usage": {"completion_tokens": tokens}}


def test_check_completion() -> None:
    assert check_completion(200, _usage(16), 16) == (OK, "")
    assert check_completion(200, _usage(32, n=2), 16, n=2)[0] == OK
    assert check_completion(200, _usage(15), 16)[0] == INCOMPLETE
    assert check_completion(200, _usage(16, n=1), 16, n=2)[0] == INCOMPLETE
    assert check_completion(200, "oops", 16)[0] == INCOMPLETE
    assert check_completion(500, {"error": {"message": "x"}}, 16)[0] == UNEXPECTED_STATUS


def test_check_stream() -> None:
    text = json.dumps({"choices": [{"text": "a"}]})
    usage = json.dumps({"choices": [], "usage": {"completion_tokens": 8}})
    assert check_stream([text, usage, DONE], 8) == (OK, "")
    assert check_stream([text, usage], 8)[0] == INCOMPLETE  # no [DONE]
    assert check_stream([text, DONE], 8)[0] == INCOMPLETE  # no usage
    assert check_stream([text, usage, DONE], 9)[0] == INCOMPLETE
    error = json.dumps({"error": {"message": "engine died"}})
    assert check_stream([text, error, DONE], 8)[0] == INCOMPLETE


def test_check_refusal() -> None:
    body = {"error": {"message": "no", "type": "invalid_request_error"}}
    assert check_refusal(400, body, 400)[0] == EXPECTED
    assert check_refusal(404, body, 400)[0] == UNEXPECTED_STATUS
    assert check_refusal(500, body, 400)[0] == UNEXPECTED_STATUS
    assert check_refusal(400, {"detail": "no"}, 400)[0] == UNEXPECTED_STATUS


def test_kind_picker_covers_every_kind_first() -> None:
    picker = KindPicker(seed=3)
    assert sorted(picker.next() for _ in KINDS) == sorted(KINDS)
    later = [picker.next() for _ in range(2000)]
    assert set(later) == set(KINDS)
    assert later.count("chat") > later.count("bad")  # weights 3 and 1


def test_prompts_are_unique_and_bounded() -> None:
    source, rng = PromptSource(), random.Random(0)
    prompts = [source.next(rng) for _ in range(200)]
    assert len(set(prompts)) == 200
    assert max(map(len, prompts)) <= PROMPT_CHARS + len("[soak 199] ")
    assert any(p.startswith("[soak") for p in prompts)
    assert any(p.endswith("]") and not p.startswith("[soak") for p in prompts)


def test_tree_rss_includes_children() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in soak.process_tree(os.getpid())
        total, procs = soak.tree_rss(os.getpid())
        assert total is not None and total > 10 * MIB
        assert {p["pid"] for p in procs} >= {os.getpid(), child.pid}
    finally:
        child.kill()
        child.wait()


def test_serve_args() -> None:
    args = soak.parse_args(
        ["--model", "m", "--server-arg=--block-size 16", "--server-arg=--no-cpu-linear-plan"]
    )
    argv = soak.serve_args(args)
    assert argv[:4] == ["--model", "m", "--max-model-len", "512"]
    assert argv[argv.index("--speculative-config") + 1] == soak.DEFAULT_SPEC
    assert argv[-3:] == ["--block-size", "16", "--no-cpu-linear-plan"]


# --- a short soak against a live server --------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_soak(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """45 s of the mixed load on the tiny random Llama: no leaked block, no unexpected error,
    every kind sent. (The 10-minute soak on SmolLM2 is `python -m loadtest.soak`.)"""
    out = tmp_path / "soak"
    rc = soak.main(
        [
            "--model",
            str(tiny_llama_dir),
            "--duration",
            "45",
            "--concurrency",
            "3",
            "--sample-interval",
            "3",
            "--out",
            str(out),
            "--startup-timeout",
            "180",
        ]
    )
    result = json.loads((out / "soak.json").read_text())
    log_tail = (out / "server.log").read_text(errors="replace")[-3000:]
    assert result["leaked_blocks"] == 0, log_tail
    assert result["idle_reached"]
    assert result["unexpected_errors"] == 0, result["unexpected_examples"]
    for kind in KINDS:
        assert sum(result["by_kind"][kind].values()) >= 1, kind
    assert result["by_kind"]["bad"][EXPECTED] == sum(result["by_kind"]["bad"].values())
    assert result["memory"]["growth_bytes"] is not None
    assert len(result["samples"]) >= 10
    assert result["latency"]["p99_drift"] is not None
    assert result["server_exit_code"] == 0, log_tail
    assert rc == 0
    for name in ("soak.json", "soak.md", "soak.png"):
        assert (out / name).stat().st_size > 0
