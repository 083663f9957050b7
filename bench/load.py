"""Load as other services would send it: `followup.requested` on exchange `followups`, published
with pipelined confirms (many publishes in flight on one channel, each one confirmed)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

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


class PipelinedPublisher:
    """Implements shared.bus.Publisher on a few aio-pika channels with confirms, taken in turn.
    Each publish still waits for its own confirm; callers keep many in flight with
    `in_windows`."""

    def __init__(
        self, connection: AbstractRobustConnection, channels: Sequence[AbstractChannel]
    ) -> None:
        self._connection = connection
        self._channels = itertools.cycle(channels)
        self._exchanges: dict[tuple[int, str], AbstractExchange] = {}

    @classmethod
    async def connect(cls, url: str, channels: int = 1) -> PipelinedPublisher:
        connection = await aio_pika.connect_robust(url)
        opened = [await connection.channel(publisher_confirms=True) for _ in range(channels)]
        return cls(connection, opened)

    async def close(self) -> None:
        await self._connection.close()

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
        channel = next(self._channels)
        target = self._exchanges.get((id(channel), exchange))
        if target is None:
            target = await channel.get_exchange(exchange, ensure=False)
            self._exchanges[(id(channel), exchange)] = target
        await target.publish(
            aio_pika.Message(
                body,
                headers=headers,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=priority,
            ),
            routing_key=routing_key,
            mandatory=mandatory,
        )

    async def request(self, body: bytes) -> None:
        await self.publish(
            body, exchange=PUBLIC_EXCHANGE, routing_key="followup.requested", mandatory=False
        )


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
    publisher: PipelinedPublisher,
    bodies: Sequence[bytes],
    window: int = 1000,
    on_progress: OnProgress | None = None,
) -> float:
    jobs = [lambda body=body: publisher.request(body) for body in bodies]
    return await in_windows(jobs, window, on_progress)
