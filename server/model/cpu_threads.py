"""How many intra-op threads the engine's torch uses on CPU.

Measured on the 2-vCPU machine this project develops on (``python -m loadtest.bench_threads``,
loadtest/results/engine/threads.md; int4 SmolLM2, offline engine, OMP_WAIT_POLICY=PASSIVE as
served): one thread beat two at every batch size, 38.1 against 24.1 tok/s at batch 1 and 104.6
against 64.4 at batch 32 (fp32: 23.8 against 18.8, 107.9 against 76.4). A decode step is
hundreds of small parallel regions, and waking a passive OpenMP worker for each costs more
than the second core gives. Spinning workers (GOMP_SPINCOUNT=10000) made a lone engine the
fastest (55.8 tok/s) and an engine beside one busy process 5-10x slower (4.9 tok/s), which is
what serving is: the API process (HTTP, detokenisation, SSE) needs a core too. Hence vLLM's
CPU backend's rule of reserving a core for the serving frontend: auto = usable cores - 1, at
least 1 (loadtest/results/serving/2026-12-03-findings.md).

specd's own kernels (int4/int8 linears, paged attention: ~90% of an int4 decode step) run on
their own pool instead (kernels/cpu/work_pool.h, ``--kernel-threads``, auto = every usable
core): a call's caller starts at once and workers claim what is left, so a worker asleep or
without a core costs the call only its share, never a wait. Measured
(``python -m loadtest.bench_engine --quantization none int4/1 int4``,
loadtest/results/engine/2026-12-04-kernel-threads/): int4 single stream 46.0 against 35.1
tok/s with one kernel thread (1.31x), batch 8 165 against 112 (1.48x), batch 32 234 against
142 (1.65x), bitwise the same tokens.
"""

from __future__ import annotations

import logging
import os

import torch

from server.model import int4_avx2

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_cpu_threads(requested: int) -> int:
    """requested > 0 as given; 0 (auto): usable cores - 1, at least 1."""
    return requested if requested > 0 else max(1, usable_cores() - 1)


def resolve_kernel_threads(requested: int) -> int:
    """requested > 0 as given; 0 (auto): usable cores. specd's own kernels may take the core
    left to the API process, because a call never waits for a thread to wake up
    (kernels/cpu/work_pool.h): when the API process holds that core, the engine's thread
    claims the whole call itself."""
    return requested if requested > 0 else usable_cores()


def apply_kernel_threads(requested: int) -> int:
    """Sets the threads of specd's CPU kernels (int4 linears, paged attention, top-k) and
    returns the count."""
    threads = resolve_kernel_threads(requested)
    int4_avx2.set_kernel_threads(threads)
    logger.info("CPU: specd's kernels run on %d thread(s)", threads)
    return threads


def apply_cpu_threads(requested: int) -> int:
    """Sets torch's intra-op threads for this process (before the model's start-up timing,
    whose plans are per thread count) and returns the count."""
    threads = resolve_cpu_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("CPU: %d intra-op thread(s) of %d usable cores", threads, usable_cores())
    return threads
