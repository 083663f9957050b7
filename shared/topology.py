"""The broker topology, declared once here and used by the services, the CLI and the tests.

exchange "followups" (topic, public)
  followup.requested | cancel_requested | reschedule_requested | response_received
    └──▶ queue followups.scheduler.inbox ──(reject)──▶ followups.scheduler.inbox.dlq
timers (see shared.timers) deliver to
    followups.personalizer.due ──▶ followups.personalizer.due.dlq
    followups.dispatcher.due   ──▶ followups.dispatcher.due.dlq
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

PUBLIC_EXCHANGE = "followups"
DEAD_LETTER_EXCHANGE = "followups.dead-letter"
DELIVERY_LIMIT = 5

TIMER_LEVELS = 33  # level k holds a message 2**k ms: 0 .. 2**33-1 ms, about 99 days
TIMER_LEVEL_PREFIX = "followups.timers.level."
TIMER_DELIVER_EXCHANGE = "followups.timers.deliver"
TIMER_PLUGIN_EXCHANGE = "followups.timers.delayed"
TIMER_ORPHANS = "followups.timers.orphans"


@dataclass(frozen=True)
class WorkQueue:
    name: str
    bindings: tuple[str, ...] = ()  # routing keys on the public exchange
    is_timer_destination: bool = False
    extra_arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dlq"

    @property
    def arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": self.dead_letter_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            **self.extra_arguments,
        }


SCHEDULER_INBOX = WorkQueue(
    "followups.scheduler.inbox",
    bindings=(
        "followup.requested",
        "followup.cancel_requested",
        "followup.reschedule_requested",
        "followup.response_received",
    ),
)
PERSONALIZER_DUE = WorkQueue("followups.personalizer.due", is_timer_destination=True)
DISPATCHER_DUE = WorkQueue("followups.dispatcher.due", is_timer_destination=True)
WORK_QUEUES = (SCHEDULER_INBOX, PERSONALIZER_DUE, DISPATCHER_DUE)


def level_name(level: int) -> str:
    return f"{TIMER_LEVEL_PREFIX}{level:02d}"


def level_pattern(level: int, bit: str) -> str:
    """Topic pattern matching routing keys whose bit for `level` is `bit`."""
    return "*." * (TIMER_LEVELS - 1 - level) + bit + ".#"


def deliver_pattern(destination: str) -> str:
    return "*." * TIMER_LEVELS + destination


def timer_queue_arguments(level: int, queue_type: str) -> dict[str, Any]:
    downstream = level_name(level - 1) if level > 0 else TIMER_DELIVER_EXCHANGE
    arguments: dict[str, Any] = {
        "x-message-ttl": 2**level,
        "x-dead-letter-exchange": downstream,
        "x-queue-type": queue_type,
    }
    if queue_type == "quorum":
        # Replicated and at-least-once: a node failure or a full downstream keeps the timer.
        arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return arguments


async def _declare_work_queues(channel: AbstractChannel, public: AbstractExchange) -> None:
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    for work in WORK_QUEUES:
        dlq = await channel.declare_queue(
            work.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx, routing_key=work.dead_letter_queue)
        queue = await channel.declare_queue(work.name, durable=True, arguments=work.arguments)
        for key in work.bindings:
            await queue.bind(public, routing_key=key)


async def _declare_levels(channel: AbstractChannel, queue_type: str) -> None:
    orphans_exchange = await channel.declare_exchange(
        TIMER_ORPHANS, aio_pika.ExchangeType.FANOUT, durable=True
    )
    orphans = await channel.declare_queue(
        TIMER_ORPHANS, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await orphans.bind(orphans_exchange)
    deliver = await channel.declare_exchange(
        TIMER_DELIVER_EXCHANGE,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": TIMER_ORPHANS},
    )
    for work in WORK_QUEUES:
        if work.is_timer_destination:
            queue = await channel.get_queue(work.name, ensure=False)
            await queue.bind(deliver, routing_key=deliver_pattern(work.name))
    below: AbstractExchange = deliver
    for level in range(TIMER_LEVELS):
        exchange = await channel.declare_exchange(
            level_name(level), aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            level_name(level), durable=True, arguments=timer_queue_arguments(level, queue_type)
        )
        await queue.bind(exchange, routing_key=level_pattern(level, "1"))
        await below.bind(exchange, routing_key=level_pattern(level, "0"))
        below = exchange


async def _declare_plugin(channel: AbstractChannel) -> None:
    delayed = await channel.declare_exchange(
        TIMER_PLUGIN_EXCHANGE,
        aio_pika.ExchangeType.X_DELAYED_MESSAGE,
        durable=True,
        arguments={"x-delayed-type": "direct"},
    )
    for work in WORK_QUEUES:
        if work.is_timer_destination:
            queue = await channel.get_queue(work.name, ensure=False)
            await queue.bind(delayed, routing_key=work.name)


async def declare_topology(url: str, *, backend: str, queue_type: str = "quorum") -> None:
    """Declare every exchange, queue and binding; idempotent, safe to run from many processes.

    `backend` is the resolved timer backend ("levels" or "plugin"), never "auto".
    """
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        public = await channel.declare_exchange(
            PUBLIC_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await _declare_work_queues(channel, public)
        if backend == "plugin":
            await _declare_plugin(channel)
        else:
            await _declare_levels(channel, queue_type)
