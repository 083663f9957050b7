"""A message whose handler always fails stops at the queue's delivery limit, in the DLQ."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from faststream.rabbit.message import RabbitMessage

from shared.bus import AmqpPublisher, make_broker
from shared.consumer import Incoming, consume, work_queue_subscriber
from shared.policies import DEFAULT_DELIVERY_LIMIT as DELIVERY_LIMIT
from shared.topology import DEAD_LETTER_EXCHANGE, WorkQueue
from tests.support.policies import work_queue_policy_for


async def test_poison_message_is_dead_lettered_after_the_delivery_limit(settings):
    work = WorkQueue(f"followups.test.poison.{uuid.uuid4().hex[:8]}")
    async with work_queue_policy_for(settings, work):
        await _run(settings, work)


async def _run(settings, work: WorkQueue) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    channel = await connection.channel()
    dlq = await channel.declare_queue(
        work.dead_letter_queue, arguments={"x-queue-type": "quorum"}, durable=True
    )
    await dlq.bind(DEAD_LETTER_EXCHANGE, routing_key=work.dead_letter_queue)
    await channel.declare_queue(work.name, durable=True, arguments=work.arguments)

    attempts: list[bytes] = []
    handled: list[bytes] = []

    async def handler(incoming: Incoming) -> None:
        if incoming.body == b"poison":
            attempts.append(incoming.body)
            raise ZeroDivisionError("a bug that fails every time")
        handled.append(incoming.body)

    broker = make_broker(settings.rabbitmq_url)
    publisher = AmqpPublisher(settings.rabbitmq_url, name="tests")

    @work_queue_subscriber(broker, work, prefetch=10)
    async def on_message(message: RabbitMessage) -> None:
        await consume(message, work, handler, publisher)

    try:
        await publisher.connect()
        await broker.start()
        await broker.publish(b"poison", queue=work.name, persist=True)
        dead = None
        for _ in range(100):
            dead = await dlq.get(fail=False)
            if dead is not None:
                break
            await asyncio.sleep(0.1)
        assert dead is not None, "the poison message never reached the dead-letter queue"
        await broker.publish(b"fine", queue=work.name, persist=True)
        for _ in range(50):
            if handled:
                break
            await asyncio.sleep(0.1)
    finally:
        await broker.stop()
        await publisher.close()
        await channel.queue_delete(work.name)
        await channel.queue_delete(work.dead_letter_queue)
        await connection.close()

    assert dead.body == b"poison"
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
    assert len(attempts) == DELIVERY_LIMIT + 1
    assert handled == [b"fine"], "the consumer kept going after the poison message"
