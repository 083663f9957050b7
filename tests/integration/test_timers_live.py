"""Timers on the real broker: delivered at their time, never early."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from shared.settings import DelayBackend
from shared.timers import (
    FIRE_AT_HEADER,
    WINDOW_HEADER,
    PluginTimer,
    broker_has_plugin,
    resolve_backend,
    to_epoch_ms,
)
from shared.topology import (
    PUBLIC_EXCHANGE,
    TIMER_DELIVER_EXCHANGE,
    TIMER_PLUGIN_EXCHANGE,
    TIMER_QUANTUM_MS,
    deliver_pattern,
)


async def _destination(url: str, exchange: str, routing_key: str):
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"followups.test.{uuid.uuid4().hex[:8]}", exclusive=True)
    await queue.bind(exchange, routing_key=routing_key(queue.name))
    return connection, queue


async def _collect(queue, expected: int, timeout: float) -> list[tuple[float, dict]]:
    received: list[tuple[float, dict]] = []
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append((time.time(), dict(message.headers)))
        await message.ack()
        if len(received) >= expected:
            done.set()

    await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), timeout)
    return received


def _lateness_ms(received):
    return [(at * 1000) - int(headers[FIRE_AT_HEADER]) for at, headers in received]


async def test_levels_deliver_200_timers_within_a_quantum_before_their_time(settings, levels_timer):
    """The broker delivers a levels timer up to a quantum early, never later on purpose; the
    receiver waits the rest out in memory (tested in tests/unit/test_timers.py)."""
    connection, queue = await _destination(
        settings.rabbitmq_url, TIMER_DELIVER_EXCHANGE, deliver_pattern
    )
    async with connection:
        now = datetime.now(UTC)
        delays = [random.uniform(0.2, 20.0) for _ in range(200)]
        await asyncio.gather(
            *(levels_timer.arm(queue.name, b"{}", now + timedelta(seconds=d)) for d in delays)
        )
        received = await _collect(queue, 200, timeout=60)
    lateness = sorted(_lateness_ms(received))
    assert len(received) == 200
    assert lateness[0] >= -TIMER_QUANTUM_MS, f"a timer arrived {-lateness[0]:.1f} ms early"
    print(
        f"\nlevels lateness ms: p50={statistics.median(lateness):.1f} "
        f"p99={lateness[int(len(lateness) * 0.99) - 1]:.1f} max={lateness[-1]:.1f}"
    )


async def test_a_windowed_timer_arrives_inside_its_window(settings, levels_timer):
    connection, queue = await _destination(
        settings.rabbitmq_url, TIMER_DELIVER_EXCHANGE, deliver_pattern
    )
    async with connection:
        fire_at = datetime.now(UTC) + timedelta(seconds=6)
        window = timedelta(seconds=4)
        await levels_timer.arm(queue.name, b"{}", fire_at, window=window)
        [(arrived, headers)] = await _collect(queue, 1, timeout=20)
    assert arrived * 1000 >= to_epoch_ms(fire_at - window) - TIMER_QUANTUM_MS
    assert arrived <= fire_at.timestamp() + 5
    assert int(headers[WINDOW_HEADER]) == 4000


async def test_auto_picks_levels_here_without_breaking_the_services_connection(settings, broker):
    has_plugin = await broker_has_plugin(settings.rabbitmq_url)
    backend = await resolve_backend(settings.rabbitmq_url, DelayBackend.AUTO)
    assert backend is (DelayBackend.PLUGIN if has_plugin else DelayBackend.LEVELS)
    # The service's own connection is untouched by the probe and still publishes.
    assert await broker.ping(timeout=5)
    await broker.publish(
        b"{}", exchange=PUBLIC_EXCHANGE, routing_key="followup.probe-check", mandatory=False
    )


async def test_plugin_backend_live_where_the_broker_has_it(settings):
    if not await broker_has_plugin(settings.rabbitmq_url):
        pytest.skip(
            "this RabbitMQ has no x-delayed-message plugin (Debian's package lacks it); "
            "its message format is tested in tests/unit/test_timers.py"
        )
    from shared.bus import AmqpPublisher

    connection, queue = await _destination(
        settings.rabbitmq_url, TIMER_PLUGIN_EXCHANGE, lambda name: name
    )
    publisher = AmqpPublisher(settings.rabbitmq_url, name="tests")
    await publisher.connect()
    try:
        timer = PluginTimer(publisher)
        now = datetime.now(UTC)
        await asyncio.gather(
            *(
                timer.arm(queue.name, b"{}", now + timedelta(seconds=random.uniform(0.2, 3)))
                for _ in range(50)
            )
        )
        async with connection:
            received = await _collect(queue, 50, timeout=20)
    finally:
        await publisher.close()
    assert min(_lateness_ms(received)) >= 0
