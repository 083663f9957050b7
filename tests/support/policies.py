"""Queue policies for the tests' own queues, reading back what the broker applied, and the work
queues as the releases before the policies declared them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika

from shared.policies import Management, QueueLimits, work_queue_policy
from shared.settings import Settings
from shared.topology import DEAD_LETTER_EXCHANGE, PUBLIC_EXCHANGE, WORK_QUEUES, WorkQueue

# The management API shows a queue's policy with its statistics, every 5 s by default.
STATS_PATIENCE_SECONDS = 30.0


def management(settings: Settings) -> Management:
    return Management.from_settings(settings.rabbitmq_url, settings.rabbitmq_management_url)


@asynccontextmanager
async def work_queue_policy_for(
    settings: Settings, work: WorkQueue, limits: QueueLimits | None = None
) -> AsyncIterator[None]:
    """The policy `followups declare` gives a work queue, put before the test declares it (a
    queue takes the policy that exists when it is declared) and removed afterwards."""
    policy = work_queue_policy(work, limits or QueueLimits())
    async with management(settings) as api:
        await api.put_policy(policy)
        try:
            yield
        finally:
            await api.delete_policy(policy.name)


async def applied_policy(api: Management, queue: str, name: str) -> dict[str, Any]:
    """The queue as the management API shows it once policy `name` is the one applied."""
    deadline = time.monotonic() + STATS_PATIENCE_SECONDS
    while True:
        info = await api.queue(queue) or {}
        if info.get("policy") == name or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.5)


def legacy_arguments(work: WorkQueue) -> dict[str, Any]:
    """How the releases before the policies declared a work queue."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": work.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_like_an_earlier_release(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        public = await channel.declare_exchange(PUBLIC_EXCHANGE, "topic", durable=True)
        dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, "direct", durable=True)
        for work in WORK_QUEUES:
            dlq = await channel.declare_queue(
                work.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await dlq.bind(dlx, routing_key=work.dead_letter_queue)
            queue = await channel.declare_queue(
                work.name, durable=True, arguments=legacy_arguments(work)
            )
            for key in work.bindings:
                await queue.bind(public, routing_key=key)
