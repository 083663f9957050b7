"""A rejected message whose dead-letter copy can't be published goes back to the queue: it is
delivered again, never left unacked, and the delivery limit still ends it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from faststream.rabbit.message import RabbitMessage

from shared.bus import AmqpPublisher, make_broker
from shared.consumer import Incoming, consume, work_queue_subscriber
from shared.errors import Rejected
from shared.policies import DEFAULT_DELIVERY_LIMIT as DELIVERY_LIMIT
from shared.topology import DEAD_LETTER_EXCHANGE, WorkQueue
from tests.support.policies import work_queue_policy_for


class DeadLetterFails(AmqpPublisher):
    """The real publisher, except that its first `failures` dead-letter publishes raise."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url, name="tests")
        self.failures = failures
        self.dead_letter_attempts = 0

    async def publish(self, body: bytes, *, exchange: str, **kwargs: Any) -> None:
        if exchange == DEAD_LETTER_EXCHANGE:
            self.dead_letter_attempts += 1
            if self.dead_letter_attempts <= self.failures:
                raise aio_pika.exceptions.DeliveryError(None, None)
        await super().publish(body, exchange=exchange, **kwargs)


@dataclass
class Queues:
    channel: AbstractChannel
    work: WorkQueue
    dlq: AbstractQueue


@pytest.fixture
async def queues(settings) -> AsyncIterator[Queues]:
    work = WorkQueue(f"followups.test.dl-fails.{uuid.uuid4().hex[:8]}")
    async with work_queue_policy_for(settings, work):
        connection = await aio_pika.connect(settings.rabbitmq_url)
        channel = await connection.channel()
        dlq = await channel.declare_queue(
            work.dead_letter_queue, arguments={"x-queue-type": "quorum"}, durable=True
        )
        await dlq.bind(DEAD_LETTER_EXCHANGE, routing_key=work.dead_letter_queue)
        await channel.declare_queue(work.name, durable=True, arguments=work.arguments)
        try:
            yield Queues(channel, work, dlq)
        finally:
            await channel.queue_delete(work.name)
            await channel.queue_delete(work.dead_letter_queue)
            await connection.close()


async def run_consumer(
    settings, queues: Queues, publisher: AmqpPublisher, until: Any
) -> list[Incoming]:
    """Consume `queues.work` with `consume` until `until(deliveries)` holds (or 20 s pass)."""
    deliveries: list[Incoming] = []

    async def handler(incoming: Incoming) -> None:
        deliveries.append(incoming)
        raise Rejected("schema", "never valid")

    broker = make_broker(settings.rabbitmq_url)

    @work_queue_subscriber(broker, queues.work, prefetch=1)
    async def on_message(message: RabbitMessage) -> None:
        await consume(message, queues.work, handler, publisher)

    await publisher.connect()
    await broker.start()
    try:
        await broker.publish(b"bad", queue=queues.work.name, persist=True)
        for _ in range(200):
            if until(deliveries):
                break
            await asyncio.sleep(0.1)
    finally:
        await broker.stop()
        await publisher.close()
    return deliveries


async def dead_letters(dlq: AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    found = []
    for _ in range(50):
        message = await dlq.get(fail=False)
        if message is not None:
            await message.ack()
            found.append(message)
        elif found:
            return found
        else:
            await asyncio.sleep(0.1)
    return found


async def test_a_failed_dead_letter_copy_returns_the_message_for_another_delivery(settings, queues):
    publisher = DeadLetterFails(settings.rabbitmq_url, failures=1)
    deliveries = await run_consumer(settings, queues, publisher, until=lambda d: len(d) >= 2)

    assert len(deliveries) == 2, "the message was never delivered again"
    assert deliveries[1].redelivered
    assert publisher.dead_letter_attempts == 2
    copies = await dead_letters(queues.dlq)
    assert [c.body for c in copies] == [b"bad"]
    assert copies[0].headers["x-error-rule"] == "schema"
    assert "x-death" not in copies[0].headers
    # Settled: nothing waits in the work queue, and nothing was held unacked by the consumer
    # (a message held unacked goes back to the queue when the consumer's channel closes).
    work = await queues.channel.declare_queue(queues.work.name, passive=True)
    assert work.declaration_result.message_count == 0


async def test_a_copy_that_never_gets_through_stops_at_the_delivery_limit(settings, queues):
    publisher = DeadLetterFails(settings.rabbitmq_url, failures=10**6)
    deliveries = await run_consumer(
        settings, queues, publisher, until=lambda d: len(d) > DELIVERY_LIMIT
    )
    copies = await dead_letters(queues.dlq)

    assert len(deliveries) == DELIVERY_LIMIT + 1
    assert [c.body for c in copies] == [b"bad"]
    assert copies[0].headers["x-death"][0]["reason"] == "delivery_limit"
