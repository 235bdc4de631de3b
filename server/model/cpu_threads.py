"""How many intra-op threads the engine's torch uses on CPU.

Measured on the 2-vCPU machine this project develops on (2026-12-03, int4 SmolLM2, engine in
one process, OMP_WAIT_POLICY=PASSIVE as served): one thread beat two at every batch size,
42.7 against 29.0 tok/s at batch 1 and 110.6 against 67.8 at batch 32 (fp32: 15.6 against
16.9 at batch 1, 78.4 against 67.0 at batch 32). A decode step is hundreds of small parallel
regions, and waking a passive OpenMP worker for each costs more than the second core gives;
letting the workers spin instead made a lone engine fast (45 tok/s) and an engine sharing its
cores with any other busy process 9x slower (5 tok/s), which is what serving is: the API
process (HTTP, detokenisation, SSE) needs a core too. Hence vLLM's CPU backend's rule of
reserving a core for the serving frontend: auto = usable cores - 1, at least 1.
"""

from __future__ import annotations

import logging
import os

import torch

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


def apply_cpu_threads(requested: int) -> int:
    """Sets torch's intra-op threads for this process (before the model's start-up timing,
    whose plans are per thread count) and returns the count."""
    threads = resolve_cpu_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("CPU: %d intra-op thread(s) of %d usable cores", threads, usable_cores())
    return threads
