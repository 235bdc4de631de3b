"""The admission queue on its own: limits, Retry-After, and that no entry can leak."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from server.api.admission import AdmissionQueue, QueueFull


async def _outputs(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def test_an_empty_queue_admits_anything_and_a_full_one_refuses() -> None:
    queue = AdmissionQueue(max_queued_requests=2, max_queued_tokens=100)
    queue.check()
    ticket = queue.admit([500])  # larger than the token limit, but alone: served
    with pytest.raises(QueueFull) as refused:
        queue.check()
    assert refused.value.reason == "queue_tokens"
    assert refused.value.status == 503 and refused.value.code == "queue_full"
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    del ticket


def test_the_request_limit_counts_choices() -> None:
    queue = AdmissionQueue(max_queued_requests=3, max_queued_tokens=10**6)
    ticket = queue.admit([4, 4])
    queue.check()
    other = queue.admit([4])
    assert (queue.queued_requests, queue.queued_tokens) == (3, 12)
    with pytest.raises(QueueFull) as refused:
        queue.check()
    assert refused.value.reason == "queue_requests"
    del ticket, other


def test_choices_leave_at_their_first_output_and_at_the_end() -> None:
    queue = AdmissionQueue(max_queued_requests=8, max_queued_tokens=10**6)

    async def run() -> None:
        ticket = queue.admit([10, 20])
        first = ticket.track(0, _outputs(3))
        assert await first.__anext__() == 0
        assert (queue.queued_requests, queue.queued_tokens) == (1, 20)
        async for _ in first:
            pass
        # The second choice's stream ends without output (an engine error, say): it leaves.
        async for _ in ticket.track(1, _outputs(0)):
            pass
        assert (queue.queued_requests, queue.queued_tokens) == (0, 0)

    asyncio.run(run())


def test_a_ticket_whose_streams_never_ran_is_settled_when_collected() -> None:
    queue = AdmissionQueue(max_queued_requests=8, max_queued_tokens=10**6)
    ticket = queue.admit([7, 7, 7])
    streams = [ticket.track(i, _outputs(1)) for i in range(3)]  # never iterated
    assert queue.queued_requests == 3
    del ticket, streams
    gc.collect()
    assert (queue.queued_requests, queue.queued_tokens) == (0, 0)


def test_retry_after_follows_the_rate_requests_leave_the_queue() -> None:
    queue = AdmissionQueue(max_queued_requests=100, max_queued_tokens=10**6)
    assert queue.retry_after_s() == 5  # nothing has left yet: a guess

    async def run() -> None:
        # 30 departures within the 30 s window: 1 per second; then 12 waiting -> 12 s.
        for _ in range(30):
            async for _ in queue.admit([1]).track(0, _outputs(1)):
                pass
        waiting = queue.admit([1] * 12)
        assert queue.retry_after_s() == 12
        del waiting

    asyncio.run(run())
