"""Stages 1 and 2: the kernel tests and kernels.bench in subprocesses, and reading their
output (pytest's summary line, the bench's rows)."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernels.gpu_check.plan import REPO, Plan
from kernels.gpu_check.stages import Deadline, StageResult

# The pytest targets of stage 1: the kernels and the Triton attention backend (alone and inside
# the engine, tree speculation included).
KERNEL_TEST_PATHS = ("tests/kernels", "tests/model/test_attention_triton.py")


# ---- 1. kernel tests ---------------------------------------------------------------------------


def _subprocess_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    if plan.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        # On CUDA the kernels must be compiled, not interpreted (tests/conftest.py sets the
        # variable only without CUDA; an inherited one would silently test the interpreter).
        env.pop("TRITON_INTERPRET", None)
    return env


def _pytest_summary(output: str) -> dict[str, int]:
    """{"passed": 40, "failed": 1, ...} from pytest's last summary line."""
    counts: dict[str, int] = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|tests? collected)", line
        )
        if found:
            for n, what in found:
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
            break
    return counts


def stage_kernel_tests(plan: Plan) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        import importlib.util

        missing = [p for p in KERNEL_TEST_PATHS if not (REPO / p).exists()]
        if missing:
            raise FileNotFoundError(f"kernel test paths moved: {missing}; update gpu_check")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
        cmd += list(KERNEL_TEST_PATHS)
        result.data["command"] = shlex.join(cmd[1:])
        if importlib.util.find_spec("pytest") is None:
            result.status = "skip"
            result.reason = (
                "pytest is not installed for this python; carry its wheels (DEVELOPERS.md)"
            )
            return
        if plan.dry_run:
            # CI runs these very tests under the interpreter on every change: a second run here
            # would only double the dry run's time.
            result.status = "skip"
            result.reason = "dry run: paths checked, not run (CI runs them under the interpreter)"
            return
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=_subprocess_env(plan),
                capture_output=True,
                text=True,
                timeout=deadline.left,
            )
        except subprocess.TimeoutExpired as e:
            result.status = "fail"
            result.reason = f"pytest ran past its {deadline.seconds:.0f} s budget"
            result.data["output_tail"] = _tail(_text(e.stdout) + _text(e.stderr))
            return
        output = proc.stdout + proc.stderr
        result.data["counts"] = _pytest_summary(output)
        result.data["returncode"] = proc.returncode
        if proc.returncode != 0:
            result.status = "fail"
            result.reason = f"pytest exited {proc.returncode}"
            result.data["output_tail"] = _tail(output)
            return
        result.status = "pass"

    return body


def _text(x: str | bytes | None) -> str:
    if isinstance(x, bytes):
        return x.decode(errors="replace")
    return x or ""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---- 2. kernel bench ---------------------------------------------------------------------------


def _bench_rows(stdout: str) -> list[dict[str, Any]]:
    """kernels.bench prints one dict per timed point as it goes: the rows survive a timeout."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{") and "kernel_us" in line:
            try:
                rows.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                continue
    return rows


def stage_kernel_bench(plan: Plan, env: dict[str, Any]) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        tbps = env.get("copy_tbps") or 3.35
        with tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as out_dir:
            cmd = [sys.executable, "-m", "kernels.bench", "--out-dir", out_dir]
            cmd += ["--hbm-tbps", str(tbps)] + (["--quick"] if plan.dry_run else [])
            result.data["command"] = shlex.join(cmd[1:3] + cmd[5:])
            result.data["hbm_tbps"] = tbps
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=REPO,
                    env=_subprocess_env(plan),
                    capture_output=True,
                    text=True,
                    timeout=deadline.left,
                )
            except subprocess.TimeoutExpired as e:
                result.data["rows"] = _bench_rows(_text(e.stdout))
                result.status = "partial" if result.data["rows"] else "fail"
                result.reason = f"ran past its {deadline.seconds:.0f} s budget; rows so far kept"
                return
            result.data["rows"] = _bench_rows(proc.stdout)
            if proc.returncode != 0:
                result.status = "fail"
                result.reason = f"kernels.bench exited {proc.returncode}: " + _tail(proc.stderr, 5)
                return
            written = Path(out_dir) / "bench_tree_attention.json"
            if written.is_file():
                result.data["rows"] = json.loads(written.read_text())["rows"]
        if not result.data["rows"]:
            result.status = "skip"
            result.reason = "kernels.bench timed nothing: " + _tail(proc.stderr, 2)
            return
        result.status = "pass"

    return body
