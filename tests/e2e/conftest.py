from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.bus import AmqpPublisher
from shared.settings import Settings
from shared.topology import PUBLIC_EXCHANGE
from testbed.infra import broker_node
from testbed.processes import ServiceSet
from testbed.webhook import WebhookReceiver


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = WebhookReceiver()
    await server.start()
    yield server
    await server.stop()


def service_env(settings: Settings, receiver: WebhookReceiver, **overrides: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": settings.database_url,
        "RABBITMQ_URL": settings.rabbitmq_url,
        "DELAY_BACKEND": broker_node().delay_backend,
        "N8N_OUTBOUND_WEBHOOK_URL": receiver.url,
        "WEBHOOK_ALLOW_INSECURE": "true",
        "QUIET_HOURS": "off",
        "SMS_RATE_LIMIT_PER_MINUTE": "100000",
        "DISPATCH_CONCURRENCY": "20",
        "PERSONALIZE_LEAD_SECONDS": "1",
        "LOG_FORMAT": "json",
        # Every e2e test runs at DEBUG and its logs are scanned for personal data at the end.
        "LOG_LEVEL": "DEBUG",
        # A free port each: test runs side by side must not fight over the default ports.
        "HTTP_PORT": "0",
    }
    if settings.rabbitmq_management_url:
        env["RABBITMQ_MANAGEMENT_URL"] = settings.rabbitmq_management_url
    env.update(overrides)
    return env


# The test contractors' phone (every spelling) and the texts the e2e tests send.
PERSONAL_VALUES = (
    "4155552671",
    "415-555-2671",
    "(415) 555",
    "a quick check-in from",
    "Hi Sam, a quick",
)


@pytest.fixture
def start_services(settings, receiver, tmp_path: Path) -> Iterator[Callable[..., ServiceSet]]:
    started: list[ServiceSet] = []

    def _start(**overrides: str) -> ServiceSet:
        services = ServiceSet(service_env(settings, receiver, **overrides), tmp_path)
        started.append(services)
        services.start()
        return services

    yield _start
    for services in started:
        services.stop()
    logs = "".join(services.logs() for services in started)
    leaked = [value for value in PERSONAL_VALUES if value in logs]
    assert not leaked, f"personal data in the service logs: {leaked}"


@pytest.fixture
async def bus(settings) -> AsyncIterator[AmqpPublisher]:
    async with AmqpPublisher(settings.rabbitmq_url, name="tests") as publisher:
        yield publisher


async def request_followup(
    bus: AmqpPublisher, contractor_id: int, due: datetime, **extra: Any
) -> None:
    body = {
        "contractor_id": contractor_id,
        "scheduled_time": due.isoformat(),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}, a quick check-in from {company_name}.",
        **extra,
    }
    await bus.publish(
        json.dumps(body).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.requested",
        mandatory=False,
    )


async def wait_for_final(pool: asyncpg.Pool, expected: int, timeout: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await pool.fetch(
            "SELECT * FROM contractor_followup_schedules"
            " WHERE status IN ('sent', 'cancelled', 'skipped', 'failed') ORDER BY id"
        )
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


class EventLog:
    """Every lifecycle event published on exchange `followups`, as the outside world sees it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def first(self, name: str, followup_id: int, timeout: float = 15.0) -> dict[str, Any]:
        """The first such event; events follow the commit, so they may still be on their way."""
        deadline = time.monotonic() + timeout
        while not (found := self.named(name, followup_id)):
            assert time.monotonic() < deadline, f"no {name} for follow-up {followup_id}"
            await asyncio.sleep(0.05)
        return found[0]

    def named(self, name: str, followup_id: int | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == name and (followup_id is None or e["followup_id"] == followup_id)
        ]


@pytest.fixture
async def events(settings) -> AsyncIterator[EventLog]:
    import aio_pika

    log = EventLog()
    connection = await aio_pika.connect(settings.rabbitmq_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(PUBLIC_EXCHANGE, routing_key="followup.#")

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        if "event" in body:
            log.events.append(body)
        await message.ack()

    await queue.consume(on_message)
    yield log
    await connection.close()


async def publish_command(bus: AmqpPublisher, routing_key: str, body: dict[str, Any]) -> None:
    await bus.publish(
        json.dumps(body, default=str).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key=routing_key,
        mandatory=False,
    )


async def followup_id_for(pool: asyncpg.Pool, key: str) -> int:
    """The row made for a request published with idempotency key `key`, once it is there."""

    async def found() -> int | None:
        return await pool.fetchval(
            "SELECT id FROM contractor_followup_schedules WHERE idempotency_key = $1", f"key:{key}"
        )

    assert await wait_until(found, 20), f"no row for {key}"
    row_id = await found()
    assert row_id is not None
    return row_id


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False
