"""One stage's result, budget and hard time limit; running a stage body; the log line."""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    name: str
    kind: str  # "correctness", "performance" or "info"
    status: str = "skip"  # pass, fail, skip, partial (ran out of its budget; numbers kept)
    seconds: float = 0.0
    budget_s: float = 0.0
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Deadline:
    """A stage's budget: loops ask `expired` between steps (a step already begun finishes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.end

    @property
    def left(self) -> float:
        return max(1.0, self.end - time.monotonic())


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- stage runner ----------------------------------------------------------------------------


class StageTimeout(Exception):
    pass


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raises StageTimeout in a stage that overruns well past its budget (a hung compile, a
    slow machine), so the stages after it still run. A step inside C code (a CUDA sync) is
    interrupted only when it returns to Python."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise StageTimeout(f"stage overran its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_stage(
    result: StageResult, budget: float, body: Callable[[StageResult, Deadline], None]
) -> StageResult:
    """Runs one stage body; any exception becomes a failed stage with its traceback."""
    result.budget_s = budget
    log(f"stage {result.name} ({result.kind}, budget {budget:.0f} s) ...")
    t0 = time.monotonic()
    try:
        with hard_limit(budget * 1.5 + 15):
            body(result, Deadline(budget))
    except Exception:
        result.status = "fail"
        result.reason = traceback.format_exc()
    result.seconds = round(time.monotonic() - t0, 1)
    first = result.reason.strip().splitlines()[-1] if result.reason.strip() else ""
    log(f"stage {result.name}: {result.status} in {result.seconds} s {first}".rstrip())
    if result.status == "fail":
        print(result.reason, file=sys.stderr, flush=True)
    return result
