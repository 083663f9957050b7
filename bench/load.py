"""Load as other services would send it: `followup.requested` on exchange `followups`, published
with pipelined confirms (many publishes in flight on the services' own publisher, each one
confirmed), either all up front or paced, each request a set time before its due time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from bench.stats import spread
from shared.bus import Publisher
from shared.topology import PUBLIC_EXCHANGE

TEMPLATE = "Hi {first_name}, a quick check-in from {company_name}."

OnProgress = Callable[[int], None]


def request_body(
    key: str, contractor_id: int, scheduled_time: datetime, *, personalize: bool = False
) -> bytes:
    return json.dumps(
        {
            "idempotency_key": key,
            "contractor_id": contractor_id,
            "scheduled_time": scheduled_time.isoformat(),
            "followup_type": "check_in",
            "message_template": TEMPLATE,
            "ai_should_personalize": personalize,
            "requested_by": "bench",
        }
    ).encode()


async def in_windows(
    jobs: Sequence[Callable[[], Awaitable[None]]],
    window: int,
    on_progress: OnProgress | None = None,
) -> float:
    """Runs `jobs` with at most `window` in flight; returns the seconds it took."""
    started = time.monotonic()
    for start in range(0, len(jobs), window):
        await asyncio.gather(*(job() for job in jobs[start : start + window]))
        if on_progress is not None:
            on_progress(min(start + window, len(jobs)))
    return time.monotonic() - started


async def publish_requests(
    publisher: Publisher,
    bodies: Sequence[bytes],
    window: int = 1000,
    on_progress: OnProgress | None = None,
) -> float:
    """`followup.requested` as other services publish it, `window` confirms in flight."""
    jobs = [
        partial(
            publisher.publish,
            body,
            exchange=PUBLIC_EXCHANGE,
            routing_key="followup.requested",
            mandatory=False,
        )
        for body in bodies
    ]
    return await in_windows(jobs, window, on_progress)


@dataclass(frozen=True)
class Pace:
    """How well the paced publisher kept to its schedule (ms behind each publish's moment)."""

    published: int
    behind_p99_ms: float | None
    behind_max_ms: float | None


def paced_moments(due: Sequence[float], advance: float) -> list[float]:
    """When each request is published: `advance` seconds before its due time (epoch seconds)."""
    return [moment - advance for moment in due]


async def publish_paced(
    publisher: Publisher,
    timed: Sequence[tuple[float, bytes]],
    window: int = 1000,
    on_progress: OnProgress | None = None,
) -> Pace:
    """Publishes each body at its wall-clock moment (epoch seconds, in order) while the earlier
    ones are still being confirmed, at most `window` unconfirmed at once. Meant to run as a
    background task beside the scenario's own waiting."""
    slots = asyncio.Semaphore(window)
    pending: list[asyncio.Task[None]] = []
    behind: list[float] = []

    async def one(body: bytes) -> None:
        try:
            await publisher.publish(
                body, exchange=PUBLIC_EXCHANGE, routing_key="followup.requested", mandatory=False
            )
        finally:
            slots.release()

    for done, (moment, body) in enumerate(timed, 1):
        ahead = moment - time.time()
        if ahead > 0:
            await asyncio.sleep(ahead)
        await slots.acquire()
        behind.append(max(0.0, time.time() - moment) * 1000)
        pending.append(asyncio.create_task(one(body)))
        if on_progress is not None and done % 100 == 0:
            on_progress(done)
    await asyncio.gather(*pending)
    if on_progress is not None:
        on_progress(len(timed))
    found = spread(behind)
    return Pace(len(timed), found.p99, found.max)
