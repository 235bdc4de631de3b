"""Summary statistics and goodput on hand-made records, and the result JSON's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.metrics import (
    format_summary,
    parse_goodput,
    percentile_key,
    result_json,
    summarize,
)
from loadtest.records import RequestRecord


def rec(
    i: int,
    ttft: float,
    latency: float,
    out: int,
    prompt: int = 10,
    ok: bool = True,
    itl: list[float] | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=i,
        success=ok,
        error="" if ok else "HTTP 400: too long",
        ttft=ttft,
        latency=latency,
        output_len=out,
        prompt_len=prompt,
        itl=itl or [],
        start_time=float(i),
        token_source="usage",
    )


RECORDS = [
    # ttft, e2el, output tokens -> tpot = (e2el - ttft) / (out - 1)
    rec(0, 0.100, 1.100, 11, itl=[0.1] * 10),  # tpot 100 ms
    rec(1, 0.200, 0.600, 5, itl=[0.1] * 4),  # tpot 100 ms
    rec(2, 0.300, 3.300, 11, itl=[0.3] * 10),  # tpot 300 ms
    rec(3, 0.050, 0.050, 1),  # one token: tpot 0
    rec(4, 0.0, 0.0, 0, prompt=99, ok=False),
]


def test_counts_and_throughput() -> None:
    s = summarize(RECORDS, duration=4.0)
    assert (s.completed, s.failed) == (4, 1)
    assert s.total_input_tokens == 40  # the failed request's prompt is not counted
    assert s.total_output_tokens == 28
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(7.0)
    assert s.total_token_throughput == pytest.approx(17.0)
    assert s.request_goodput is None


def test_percentiles_match_numpy() -> None:
    s = summarize(RECORDS, 4.0, percentiles=(50, 90, 99.9))
    ttft_ms = np.array([100.0, 200.0, 300.0, 50.0])
    assert s.stats["ttft"]["mean"] == pytest.approx(162.5)
    assert s.stats["ttft"]["median"] == pytest.approx(150.0)
    assert s.stats["ttft"]["std"] == pytest.approx(ttft_ms.std())
    assert s.stats["ttft"]["p90"] == pytest.approx(np.percentile(ttft_ms, 90))
    assert s.stats["ttft"]["p99.9"] == pytest.approx(np.percentile(ttft_ms, 99.9))
    assert s.stats["tpot"]["median"] == pytest.approx(100.0)  # [100, 100, 300, 0]
    assert s.stats["tpot"]["mean"] == pytest.approx(125.0)
    assert s.stats["itl"]["median"] == pytest.approx(100.0)  # 14 x 100 ms, 10 x 300 ms
    assert s.stats["e2el"]["p50"] == pytest.approx(850.0)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    slos = parse_goodput(["ttft:250", "tpot:150"])
    # rec 0, 1, 3 pass both; rec 2 fails both; the failed request never counts.
    assert summarize(RECORDS, 4.0, slos).request_goodput == pytest.approx(3 / 4)
    # E2EL 1000 ms: rec 1 (600) and rec 3 (50) only.
    assert summarize(RECORDS, 4.0, {"e2el": 1000}).request_goodput == pytest.approx(2 / 4)


def test_parse_goodput_errors() -> None:
    assert parse_goodput(["e2el:1.5"]) == {"e2el": 1.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_percentile_key_like_vllm() -> None:
    assert [percentile_key(p) for p in (99, 99.0, 99.9, 50)] == ["p99", "p99", "p99.9", "p50"]


def test_empty_run_reports_zeros() -> None:
    s = summarize([rec(0, 0, 0, 0, ok=False)], 1.0, {"ttft": 1})
    assert s.completed == 0 and s.request_goodput == 0.0
    assert s.stats["ttft"]["p99"] == 0.0


VLLM_KEYS = [
    "duration", "completed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors",
] + [
    f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p99")
]  # fmt: skip


def test_result_json_has_vllm_keys() -> None:
    s = summarize(RECORDS, 4.0, {"ttft": 250})
    out = result_json(s, RECORDS, {"date": "20250101-000000", "model_id": "m"})
    missing = [k for k in VLLM_KEYS if k not in out]
    assert not missing
    assert len(out["ttfts"]) == len(out["errors"]) == len(out["requests"]) == len(RECORDS)
    assert out["output_lens"][4] == 0 and out["errors"][4].startswith("HTTP 400")
    assert out["requests"][2]["tpot"] == pytest.approx(0.3)
    assert out["p99_tpot_ms"] == pytest.approx(np.percentile([100, 100, 300, 0], 99))
    json.dumps(out)  # serialisable as is
    assert "Successful requests:" in format_summary(s)
