"""Graceful drain on SIGTERM, as a load balancer or Kubernetes expects it.

SIGTERM does not stop the listener at once (uvicorn's default: new connections would be
refused, which a proxy cannot tell from a crash). Instead the server starts draining: `/ready`
turns 503 so the balancer takes it out of rotation, new generation requests get 503 with
`Retry-After` (code `draining`, retried elsewhere), and requests in flight run to the end.
Once none is left, or `--shutdown-timeout` seconds have passed, uvicorn shuts down as usual
and the process exits 0. A second SIGTERM, or SIGINT, stops at once (uvicorn's own handling).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)


class DrainState:
    """Whether the server is draining; the routes and /ready read it."""

    def __init__(self) -> None:
        self.draining = False
        self.deadline = 0.0


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        state: DrainState,
        num_in_flight: Callable[[], int],
        shutdown_timeout_s: float,
    ) -> None:
        super().__init__(config)
        self.state = state
        self.num_in_flight = num_in_flight
        self.shutdown_timeout_s = shutdown_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        # Not recorded as a captured signal: uvicorn would re-raise it after shutting down,
        # and the process would die of SIGTERM instead of exiting 0 after its drain.
        if self.state.draining:
            self.should_exit = True
            return
        # A signal handler: only set flags here; on_tick (every 0.1 s) does the rest.
        self.state.draining = True
        self.state.deadline = time.monotonic() + self.shutdown_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and not self.should_exit:
            in_flight = self.num_in_flight()
            if in_flight == 0 or time.monotonic() >= self.state.deadline:
                logger.info("drained (%d requests still in flight); shutting down", in_flight)
                self.should_exit = True
            elif counter % 10 == 0:
                logger.info("draining: %d requests in flight", in_flight)
        return await super().on_tick(counter)
