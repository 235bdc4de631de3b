"""The requests of one (workload, rate): arrivals as the real load generator sends them
(``loadtest.arrivals.send_times``: gamma gaps, Poisson at burstiness 1), lengths and
acceptance drawn from the workload's distributions. Seeded per (seed, workload, rate), so every
policy serves the very same trace."""

from __future__ import annotations

import numpy as np

from loadtest.arrivals import send_times
from loadtest.sim import dists
from loadtest.sim.config import Workload
from loadtest.sim.engine import SimRequest


def make_trace(
    workload: Workload,
    rate: float,
    num_requests: int,
    seed: int,
    stream: int,
    burstiness: float = 1.0,
) -> list[SimRequest]:
    """``stream``: which (workload, rate) of the sweep this is (keeps their traces apart)."""
    seq = np.random.SeedSequence([seed, stream])
    arrival_seed, draw_seed, request_seed = (int(s.generate_state(1)[0]) for s in seq.spawn(3))
    arrivals = send_times(num_requests, rate, burstiness, seed=arrival_seed)
    rng = np.random.default_rng(draw_seed)
    prompt = np.maximum(dists.draw(workload.prompt_len, num_requests, rng, integer=True), 1)
    output = np.maximum(dists.draw(workload.output_len, num_requests, rng, integer=True), 1)
    alpha = np.clip(dists.draw(workload.acceptance, num_requests, rng, integer=False), 0.0, 1.0)
    return [
        SimRequest(
            request_id=f"{workload.name}-{stream}-{i}",
            arrival=float(arrivals[i]),
            prompt_len=int(prompt[i]),
            output_len=int(output[i]),
            alpha=float(alpha[i]),
            seed=request_seed + i,
        )
        for i in range(num_requests)
    ]
