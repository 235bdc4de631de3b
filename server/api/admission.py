"""Admission control: a bounded waiting queue, refused early with 503 + Retry-After.

The engine runs at most ``max_num_seqs`` requests; everything else waits. Without a bound a
burst queues without limit and clients time out after minutes instead of being told, at once,
to retry (elsewhere, for a load balancer). Here "queued" means an engine request (one choice)
that the server has admitted and that has not produced its first token yet: waiting in the
scheduler, or still in prefill. Two limits, as vLLM names them: requests
(``max_num_queued_reqs``) and their prompt tokens (``max_num_queued_tokens``).

``check`` runs first thing in a generation route, before any tokenising or chat-template
rendering, so a refusal costs almost nothing. ``admit`` counts a request's choices the moment
its prompts are known (synchronously, so a burst that arrives at once sees every admission
before it), and ``Ticket.track`` takes each choice out of the queue at its first output or
when its stream ends. A ticket whose streams never ran (a client gone before its response
started) is settled when it is garbage-collected, so the counts cannot leak.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from server.api.errors import APIError

T = TypeVar("T")

# Seconds of queue departures the Retry-After estimate looks back over.
_RATE_WINDOW_S = 30.0
# Retry-After bounds (seconds), and its value when nothing has left the queue lately.
_RETRY_MIN_S, _RETRY_MAX_S, _RETRY_UNKNOWN_S = 1, 60, 5


class QueueFull(APIError):
    """503 with a Retry-After header: the waiting queue is at one of its limits."""

    def __init__(self, message: str, retry_after_s: int, reason: str) -> None:
        super().__init__(message, status=503, code="queue_full")
        self.retry_after_s = retry_after_s
        self.reason = reason

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


@dataclass
class _Pending:
    """The queue entries of one admitted request: prompt tokens per choice not yet started."""

    tokens: dict[int, int] = field(default_factory=dict)


class AdmissionQueue:
    def __init__(self, max_queued_requests: int, max_queued_tokens: int) -> None:
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.queued_requests = 0
        self.queued_tokens = 0
        # Monotonic times of recent departures from the queue (first outputs), for Retry-After.
        self._departures: deque[float] = deque()

    def check(self) -> None:
        """Raises QueueFull when either limit is reached. An empty queue admits anything, so a
        request larger than a limit is served alone rather than never."""
        if self.queued_requests == 0:
            return
        if self.queued_requests >= self.max_queued_requests:
            raise QueueFull(
                f"The server is overloaded: {self.queued_requests} requests are waiting "
                f"(limit {self.max_queued_requests}). Retry later.",
                self.retry_after_s(),
                "queue_requests",
            )
        if self.queued_tokens >= self.max_queued_tokens:
            raise QueueFull(
                f"The server is overloaded: {self.queued_tokens} prompt tokens are waiting "
                f"(limit {self.max_queued_tokens}). Retry later.",
                self.retry_after_s(),
                "queue_tokens",
            )

    def admit(self, prompt_tokens: list[int]) -> Ticket:
        """Queues one entry per choice (its prompt's token count); see ``Ticket``."""
        pending = _Pending(dict(enumerate(prompt_tokens)))
        self.queued_requests += len(prompt_tokens)
        self.queued_tokens += sum(prompt_tokens)
        return Ticket(self, pending)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: queued requests / recent departures per
        second, within [1, 60]."""
        now = time.monotonic()
        while self._departures and now - self._departures[0] > _RATE_WINDOW_S:
            self._departures.popleft()
        if not self._departures:
            return _RETRY_UNKNOWN_S
        rate = len(self._departures) / _RATE_WINDOW_S
        return min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(self.queued_requests / rate)))

    def _leave(self, pending: _Pending, index: int, started: bool) -> None:
        tokens = pending.tokens.pop(index, None)
        if tokens is None:
            return
        self.queued_requests -= 1
        self.queued_tokens -= tokens
        if started:
            self._departures.append(time.monotonic())

    def _settle(self, pending: _Pending) -> None:
        for index in list(pending.tokens):
            self._leave(pending, index, started=False)


class Ticket:
    """One admitted request's queue entries; each choice leaves at its first output."""

    def __init__(self, queue: AdmissionQueue, pending: _Pending) -> None:
        self._queue = queue
        self._pending = pending
        # Settles what no stream took out of the queue, once the request's objects are gone.
        weakref.finalize(self, queue._settle, pending)

    async def track(self, index: int, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """``stream`` (choice ``index``'s engine stream), leaving the queue as it starts."""
        iterator = aiter(stream)
        try:
            try:
                first = await anext(iterator)
            except StopAsyncIteration:
                return
            self._queue._leave(self._pending, index, started=True)
            yield first
            async for item in iterator:  # out of the queue now: a plain pass-through
                yield item
        finally:
            self._queue._leave(self._pending, index, started=False)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
