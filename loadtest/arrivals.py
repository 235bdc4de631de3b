"""When each request is sent: gamma-distributed inter-arrival gaps, as `vllm bench serve`.

With rate r and burstiness b the gap is Gamma(shape=b, scale=1/(r*b)): mean 1/r whatever b,
coefficient of variation 1/sqrt(b). b = 1 is a Poisson process (exponential gaps); b < 1 is
burstier, b > 1 more regular. rate = inf sends everything at t = 0.
"""

from __future__ import annotations

import math

import numpy as np


def inter_arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` gaps in seconds (float64, shape [n]). The first request waits gaps[0] too."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Offsets from the start of the run at which each of the `n` requests is sent, shape [n]."""
    return np.cumsum(inter_arrival_gaps(n, rate, burstiness, seed))
