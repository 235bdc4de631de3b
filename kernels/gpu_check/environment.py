"""The report's header: device, versions, host and the measured copy bandwidth."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from statistics import median
from typing import Any

from kernels.gpu_check.plan import REPO, Plan
from kernels.gpu_check.stages import Deadline, StageResult

# HBM bandwidth as sold, TB/s, by a substring of torch.cuda.get_device_name() (first match).
# Only for the report: floors use the bandwidth measured by a device-to-device copy.
NOMINAL_HBM_TBPS = (
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100", 1.555),
)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted): the achievable HBM rate."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()  # the pytest and bench subprocesses want that memory
    return 2 * nbytes / median(times)


def nominal_hbm_tbps(name: str) -> float | None:
    return next((tbps for key, tbps in NOMINAL_HBM_TBPS if key in name), None)


def _command_output(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(plan: Plan) -> dict[str, Any]:
    """Device, versions and the host: the report's header."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "git_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    for mod in ("triton", "transformers", "pytest"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: the report says so
            env[mod] = None
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = f"{props.major}.{props.minor}"
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _command_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        )
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, dry run)"
        env["driver"] = None
    return env


def stage_environment(plan: Plan, env: dict[str, Any]) -> Callable[[StageResult, Deadline], None]:
    def body(result: StageResult, deadline: Deadline) -> None:
        env.update(environment(plan))
        bw = measure_copy_bandwidth(plan.device, plan.copy_bytes)
        env["copy_tbps"] = round(bw / 1e12, 3)
        env["nominal_hbm_tbps"] = nominal_hbm_tbps(env["device"])
        result.data = {
            "copy_tbps": env["copy_tbps"],
            "nominal_hbm_tbps": env["nominal_hbm_tbps"],
            "copy_bytes": plan.copy_bytes,
        }
        result.status = "pass"

    return body


def device_name(plan: Plan) -> str:
    import torch

    if plan.device == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu"
