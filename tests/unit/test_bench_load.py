"""The paced publisher: each request at its moment by the wall clock, a bounded confirm window."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.load import paced_moments, publish_paced


class RecordingPublisher:
    """A Publisher whose confirms take `confirm` seconds; records when each publish began."""

    def __init__(self, confirm: float = 0.0) -> None:
        self.confirm = confirm
        self.started: list[tuple[float, bytes]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
        mandatory: bool = True,
    ) -> None:
        assert (exchange, routing_key) == ("followups", "followup.requested")
        self.started.append((time.time(), body))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.confirm)
        self.in_flight -= 1


def test_each_request_goes_out_advance_seconds_before_it_is_due():
    assert paced_moments([100.0, 100.5], 8.0) == [92.0, 92.5]


async def test_requests_go_out_in_order_and_never_before_their_moment():
    publisher = RecordingPublisher()
    start = time.time() + 0.05
    timed = [(start + i * 0.01, f"r{i}".encode()) for i in range(20)]
    pace = await publish_paced(publisher, timed, window=5)
    assert [body for _, body in publisher.started] == [body for _, body in timed]
    assert all(at >= moment for (at, _), (moment, _) in zip(publisher.started, timed, strict=True))
    assert pace.published == 20
    assert pace.behind_max_ms is not None
    assert pace.behind_max_ms >= 0


async def test_no_more_than_the_window_waits_for_confirms():
    publisher = RecordingPublisher(confirm=0.02)
    now = time.time()
    timed = [(now, b"x")] * 30  # all due now: only the window holds them back
    await publish_paced(publisher, timed, window=4)
    assert len(publisher.started) == 30
    assert publisher.most_in_flight == 4
