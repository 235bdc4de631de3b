"""Glue between a run and its outputs: run the samples, summarise, build the result JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from loadtest.host import loadavg_1min
from loadtest.metrics import METRICS, Summary, format_summary, result_json, summarize
from loadtest.records import Sample
from loadtest.runner import RunConfig, RunOutput, run_benchmark


@dataclass(frozen=True)
class ReportConfig:
    slos: dict[str, float]
    percentiles: tuple[float, ...] = (99.0,)
    metrics: tuple[str, ...] = METRICS
    label: str = ""
    dataset_name: str = ""
    tokenizer_id: str = "approx"


@dataclass
class BenchResult:
    summary: Summary
    output: RunOutput
    result: dict[str, Any]


async def detect_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id /v1/models lists (what `vllm bench serve` does without --model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=10.0) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def benchmark(cfg: RunConfig, samples: list[Sample], rep: ReportConfig) -> BenchResult:
    # The machine may be shared: the 1-minute load average before and after the run says how
    # much else ran on it.
    loadavg_before = loadavg_1min()
    out = await run_benchmark(cfg, samples)
    summary = summarize(out.records, out.duration, rep.slos, rep.percentiles, rep.metrics)
    header = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if cfg.api.chat else "openai",
        "label": rep.label,
        "base_url": cfg.api.base_url,
        "endpoint": cfg.api.endpoint,
        "model_id": cfg.api.model,
        "tokenizer_id": rep.tokenizer_id,
        "dataset_name": rep.dataset_name,
        "num_prompts": len(samples),
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "goodput_slos_ms": rep.slos or None,
    }
    header["loadavg_before"] = loadavg_before
    header["loadavg_after"] = loadavg_1min()
    result = result_json(summary, out.records, header)
    result.update(out.extra_json())
    return BenchResult(summary, out, result)


def print_report(res: BenchResult) -> None:
    print(format_summary(res.summary))
    if res.output.not_sent:
        print(f"not sent (past --duration): {res.output.not_sent}")
    if res.output.spec:
        print(
            "speculative decoding (server /metrics delta): "
            + ", ".join(f"{k}={v:.4g}" for k, v in res.output.spec.items())
        )
    errors = [r.error for r in res.output.records if not r.success]
    if errors:
        first = sorted(set(errors))[:3]
        print(f"{len(errors)} failed requests; first distinct errors:")
        for e in first:
            print(f"  {e[:300]}")


def write_json(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(p)
