"""The services' publisher against the real broker: confirmed, persistent, loud when unroutable."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import aio_pika
import pytest

from shared.bus import AmqpPublisher
from shared.errors import RetryLater
from shared.metrics import PUBLISHED
from shared.retry_policy import TRANSIENT
from shared.topology import PUBLIC_EXCHANGE
from testbed.infra import broker_node


async def test_publish_is_confirmed_persistent_json_with_its_headers(settings, publisher):
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        routing_key = f"test.{uuid.uuid4().hex[:8]}"
        await queue.bind(PUBLIC_EXCHANGE, routing_key)
        before = PUBLISHED.labels("tests", f"{PUBLIC_EXCHANGE}.{routing_key}")._value.get()

        await publisher.publish(
            b'{"a": 1}', exchange=PUBLIC_EXCHANGE, routing_key=routing_key, headers={"x-n": 7}
        )

        message = await queue.get(timeout=5)
        await message.ack()
    assert message.body == b'{"a": 1}'
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["x-n"] == 7
    assert message.timestamp is not None
    after = PUBLISHED.labels("tests", f"{PUBLIC_EXCHANGE}.{routing_key}")._value.get()
    assert after == before + 1


async def test_an_unroutable_mandatory_publish_raises_and_an_optional_one_does_not(publisher):
    nowhere = f"nobody.listens.{uuid.uuid4().hex[:8]}"
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key=nowhere)
    await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key=nowhere, mandatory=False)


async def test_a_publish_the_broker_refuses_is_retried_later(settings, publisher):
    """A queue at its length limit with reject-publish nacks the publish: transient, so the
    consumer retries the handler instead of spending the message's delivery limit."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        routing_key = f"test.{uuid.uuid4().hex[:8]}"
        await queue.bind(PUBLIC_EXCHANGE, routing_key)
        await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key=routing_key)
        with pytest.raises(RetryLater, match="did not take a publish") as refused:
            await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key=routing_key)
    assert isinstance(refused.value, TRANSIENT)
    assert isinstance(refused.value.__cause__, aio_pika.exceptions.DeliveryError)


async def test_publishing_before_connecting_says_what_to_do(settings):
    publisher = AmqpPublisher(settings.rabbitmq_url, name="tests")
    with pytest.raises(RuntimeError, match="connect"):
        await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key="x")
    assert not publisher.is_connected


async def test_a_publish_on_a_closed_channel_is_retried_later_and_counted_nowhere(settings):
    """A channel closed under the publisher (between reconnects, or given up) is a moment's
    trouble: the handler retries the same publish, and no publish is counted that was not sent."""
    name = f"tests-{uuid.uuid4().hex[:8]}"
    routing_key = f"test.{uuid.uuid4().hex[:8]}"
    async with AmqpPublisher(settings.rabbitmq_url, name=name) as publisher:
        await publisher._channel.close()
        with pytest.raises(RetryLater, match="ChannelInvalidStateError") as refused:
            await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key=routing_key)
    assert isinstance(refused.value, TRANSIENT)
    assert PUBLISHED.labels(name, f"{PUBLIC_EXCHANGE}.{routing_key}")._value.get() == 0


def _publishing_connection_pids(vhost: str, name: str) -> list[str]:
    listed = subprocess.run(
        broker_node().cli("list_connections", "-p", vhost, "pid", "client_properties"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    marker = f'"connection_name","followups-{name} (publishing)"'
    return [line.split("\t", 1)[0] for line in listed.splitlines() if marker in line]


async def _until(condition, patience: float = 30.0) -> bool:
    for _ in range(int(patience / 0.1)):
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


async def test_a_dropped_publishing_connection_shows_and_comes_back(infra, settings):
    name = f"tests-{uuid.uuid4().hex[:8]}"
    async with AmqpPublisher(settings.rabbitmq_url, name=name) as publisher:
        [pid] = _publishing_connection_pids(infra.name, name)
        subprocess.run(broker_node().cli("close_connection", pid, "closed by a test"), check=True)
        assert await _until(lambda: not publisher.is_connected), "the drop went unnoticed"
        assert await _until(lambda: publisher.is_connected), "it never reconnected"
        await publisher.publish(
            b"{}", exchange=PUBLIC_EXCHANGE, routing_key="nobody.listens", mandatory=False
        )
