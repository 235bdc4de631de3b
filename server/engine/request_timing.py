"""One request's timeline as the API process sees it, for the latency histograms on /metrics.

All times are time.monotonic(), which is one clock across the API process and the engine core
(CLOCK_MONOTONIC on Linux), so the engine's "first scheduled" stamp can be compared with the
API's arrival and token times. The phases, as vLLM defines them:

    arrival --queue--> first scheduled --prefill--> first token --decode--> finished
    |<------------------------- e2e ---------------------------------------->|
    |<------------- time to first token ------------>|
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RequestTiming:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    # "stop" | "length" | "abort"
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def prefill_s(self) -> float | None:
        if self.first_token is None or self.first_scheduled is None:
            return None
        return self.first_token - self.first_scheduled

    @property
    def decode_s(self) -> float | None:
        if self.finished is None or self.first_token is None:
            return None
        return self.finished - self.first_token

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    def tokens_arrived(self, now: float, count: int) -> float | None:
        """Records an output carrying ``count`` new tokens; returns the gap since the previous
        one (an inter-token latency: one per engine step that emitted tokens, as vLLM), or
        None for the first token."""
        if count <= 0:
            return None
        gap = None if self.last_token is None else now - self.last_token
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.num_generation_tokens += count
        return gap


class RequestObserver(Protocol):
    """Who the engine client tells about each request's progress (server.metrics)."""

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, timing: RequestTiming) -> None: ...
