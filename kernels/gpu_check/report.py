"""Where the results go, and their markdown and JSON."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kernels.gpu_check.plan import REPO, Plan
from kernels.gpu_check.stages import StageResult


def slug(text: str) -> str:
    """Letters, digits and '-' only: the device tool brings back only such file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(plan: Plan, device_name: str, date: str) -> Path:
    name = f"{date}-{slug(device_name.split('(')[0])}.md"
    if plan.dry_run:
        return Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) / name
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return REPO / "loadtest" / "results" / "gpu" / name


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def render_markdown(meta: dict[str, Any], results: list[StageResult]) -> str:
    env = meta["environment"]
    lines = [
        f"# gpu-check on {env.get('device')} ({meta['date']})",
        "",
        f"- device: {env.get('device')}",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}" + (" (dry run: CPU, tiny shapes)" if meta["dry_run"] else ""),
        "- versions: "
        + ", ".join(
            f"{k} {env.get(k)}"
            for k in ("python", "torch", "triton", "cuda", "driver", "transformers", "pytest")
        ),
        f"- host: {env.get('host')}, git {env.get('git_commit')}, total {meta['seconds']} s"
        + ("" if meta["complete"] else " (INCOMPLETE: the run stopped before its last stage)"),
        f"- floors: bytes read / the measured copy bandwidth {env.get('copy_tbps')} TB/s "
        f"(nominal HBM: {env.get('nominal_hbm_tbps')} TB/s); engine steps are whole "
        "ModelRunner.execute calls (host preparation, forward, sampling or verification)",
        "",
        "| stage | kind | status | seconds | budget s | reason |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in results:
        reason = (r.reason.strip().splitlines() or [""])[-1].replace("|", "\\|")
        lines.append(
            f"| {r.name} | {r.kind} | {r.status} | {r.seconds} | {r.budget_s:.0f} | {reason} |"
        )
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", ""]
        scalars = {k: v for k, v in r.data.items() if k not in ("rows", "output_tail")}
        lines += [f"- {k}: {v}" for k, v in scalars.items()]
        if "rows" in r.data:
            lines += ["", *_table(r.data["rows"])]
        if r.data.get("output_tail"):
            lines += ["", "```", r.data["output_tail"], "```"]
        if r.status == "fail" and "\n" in r.reason.strip():
            lines += ["", "```", r.reason.strip(), "```"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], results: list[StageResult]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(meta, results))
    payload = {"meta": meta, "stages": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
