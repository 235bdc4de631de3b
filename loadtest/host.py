"""The machine a benchmark ran on: CPU, cores, memory, load average, git commit.

Load averages are read at given moments by the callers (sweep start, each run's start and
end): a report that read /proc/loadavg only when it was written would describe the load the
sweep itself made, not the state of a shared machine before it began.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

LoadAvg = tuple[float, float, float]  # 1, 5 and 15 minute load averages


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def loadavg() -> LoadAvg | None:
    """/proc/loadavg now, or None where there is none (not Linux)."""
    try:
        one, five, fifteen = (float(x) for x in _read("/proc/loadavg").split()[:3])
    except ValueError:  # missing file (empty text) or an unexpected format
        return None
    return one, five, fifteen


def loadavg_1min() -> float | None:
    la = loadavg()
    return None if la is None else la[0]


def format_loadavg(la: LoadAvg | list[float] | None) -> str:
    return "unknown" if la is None else " ".join(f"{x:.2f}" for x in la)


# The widest SIMD extension decides which CPU kernels torch runs (int4 matmuls included), so
# two "AMD EPYC" hosts can differ 2x on the same benchmark: reports name it.
_SIMD_LEVELS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"))


def cpu_simd(cpuinfo: str) -> str:
    """The widest SIMD extension in /proc/cpuinfo's flags ("unknown" without them)."""
    flags: set[str] = set()
    for ln in cpuinfo.splitlines():
        if ln.startswith(("flags", "Features")):
            flags.update(ln.split(":", 1)[1].split())
            break
    return next((name for flag, name in _SIMD_LEVELS if flag in flags), "unknown")


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(ln.split()[1])
            for ln in _read("/proc/meminfo").splitlines()
            if ln.startswith("MemTotal:")
        ),
        0,
    )
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu,
        "cpu_simd": cpu_simd(_read("/proc/cpuinfo")),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }


def git_info() -> dict[str, str]:
    def git(*a: str) -> str:
        try:
            r = subprocess.run(
                ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "none (no commit yet)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": "yes" if dirty else "no"}
