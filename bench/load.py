"""Load as other services would send it: `followup.requested` on exchange `followups`, published
with pipelined confirms (many publishes in flight on the services' own publisher, each one
confirmed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import partial

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
