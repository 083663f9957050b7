"""The broker topology, declared once here and used by the services, the CLI and the tests.

exchange "followups" (topic, public)
  followup.requested | cancel_requested | reschedule_requested | response_received
  | delivery_reported
    └──▶ queue followups.scheduler.inbox ──(reject)──▶ followups.scheduler.inbox.dlq
timers (see shared.timers) deliver to
    followups.personalizer.due ──▶ followups.personalizer.due.dlq
    followups.dispatcher.due   ──▶ followups.dispatcher.due.dlq

What a work or dead-letter queue does with its messages (delivery limit, dead-letter target,
caps) is in its policy (shared.policies), which `followups declare` applies; here they are
declared by type alone, so a policy can change them without deleting a queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

PUBLIC_EXCHANGE = "followups"
DEAD_LETTER_EXCHANGE = "followups.dead-letter"
# Earlier releases declared the work queues with these x-arguments, which are in their policy
# now; such a queue can't be redeclared without them (PRECONDITION_FAILED, inequivalent arg).
LEGACY_WORK_ARGUMENTS = (
    "x-delivery-limit",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-overflow",
)

# The `levels` timers spell a delay in base TIMER_RADIX, in units of TIMER_QUANTUM_MS, one digit
# per position: queue (p, d) holds a message d * 16**p units and passes it to position p - 1. A
# timer takes one hop per nonzero digit, so a wide radix means few hops: 15 queues a position, six
# positions, a horizon of 16**6 - 1 units (about 49.7 days). A timer delivered up to a quantum
# early is waited out in the receiver's memory (shared.timers.wait_until_due).
TIMER_RADIX = 16
TIMER_POSITIONS = 6
TIMER_QUANTUM_MS = 256
TIMER_LEVEL_PREFIX = "followups.timers.digit."
# The binary levels of earlier releases (33 words of 0/1 before the destination): their queues
# drain into the deliver exchange by themselves after an upgrade.
LEGACY_TIMER_WORDS = 33
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
        return {"x-queue-type": "quorum", **self.extra_arguments}


SCHEDULER_INBOX = WorkQueue(
    "followups.scheduler.inbox",
    bindings=(
        "followup.requested",
        "followup.cancel_requested",
        "followup.reschedule_requested",
        "followup.response_received",
        "followup.delivery_reported",
    ),
)
PERSONALIZER_DUE = WorkQueue("followups.personalizer.due", is_timer_destination=True)
DISPATCHER_DUE = WorkQueue("followups.dispatcher.due", is_timer_destination=True)
WORK_QUEUES = (SCHEDULER_INBOX, PERSONALIZER_DUE, DISPATCHER_DUE)


def position_exchange(position: int) -> str:
    return f"{TIMER_LEVEL_PREFIX}{position}"


def digit_queue(position: int, digit: int) -> str:
    """e.g. `followups.timers.digit.2.a`: holds a message 10 * 16**2 quanta."""
    return f"{TIMER_LEVEL_PREFIX}{position}.{digit:x}"


def timer_queues() -> list[str]:
    return [
        digit_queue(position, digit)
        for position in range(TIMER_POSITIONS)
        for digit in range(1, TIMER_RADIX)
    ]


def digit_pattern(position: int, digit: int) -> str:
    """Topic pattern matching routing keys whose digit at `position` is `digit`."""
    return "*." * (TIMER_POSITIONS - 1 - position) + f"{digit:x}" + ".#"


def deliver_pattern(destination: str, words: int = TIMER_POSITIONS) -> str:
    return "*." * words + destination


def timer_queue_arguments(position: int, digit: int, queue_type: str) -> dict[str, Any]:
    downstream = position_exchange(position - 1) if position > 0 else TIMER_DELIVER_EXCHANGE
    arguments: dict[str, Any] = {
        "x-message-ttl": digit * TIMER_RADIX**position * TIMER_QUANTUM_MS,
        "x-dead-letter-exchange": downstream,
        "x-queue-type": queue_type,
    }
    if queue_type == "quorum":
        # Replicated and at-least-once: a node failure or a full downstream keeps the timer.
        arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return arguments


def _names_legacy_argument(exc: aiormq.exceptions.ChannelPreconditionFailed) -> bool:
    text = str(exc)
    return "inequivalent arg" in text and any(f"'{key}'" in text for key in LEGACY_WORK_ARGUMENTS)


async def _declare_work_queue(
    channel: AbstractChannel, work: WorkQueue
) -> tuple[AbstractQueue, bool]:
    """The queue, declared; or, when an earlier release declared it with the x-arguments its
    policy holds now, the existing queue as it is, and True (it works as before; `followups
    declare --migrate-queues` moves it). Any other difference is an error."""
    try:
        return await channel.declare_queue(work.name, durable=True, arguments=work.arguments), False
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        if not _names_legacy_argument(exc):
            raise
    # The refusal closed the channel.
    await channel.reopen()
    return await channel.declare_queue(work.name, passive=True), True


async def _declare_work_queues(channel: AbstractChannel, public: AbstractExchange) -> list[str]:
    """Returns the work queues left as an earlier release declared them."""
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    legacy = []
    for work in WORK_QUEUES:
        dlq = await channel.declare_queue(
            work.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx, routing_key=work.dead_letter_queue)
        queue, is_legacy = await _declare_work_queue(channel, work)
        if is_legacy:
            legacy.append(work.name)
        for key in work.bindings:
            await queue.bind(public, routing_key=key)
    return legacy


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
            await queue.bind(deliver, routing_key=deliver_pattern(work.name, LEGACY_TIMER_WORDS))
    below: AbstractExchange = deliver
    for position in range(TIMER_POSITIONS):
        exchange = await channel.declare_exchange(
            position_exchange(position), aio_pika.ExchangeType.TOPIC, durable=True
        )
        for digit in range(1, TIMER_RADIX):
            queue = await channel.declare_queue(
                digit_queue(position, digit),
                durable=True,
                arguments=timer_queue_arguments(position, digit, queue_type),
            )
            await queue.bind(exchange, routing_key=digit_pattern(position, digit))
        await below.bind(exchange, routing_key=digit_pattern(position, 0))
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


async def declare_topology(url: str, *, backend: str, queue_type: str = "quorum") -> list[str]:
    """Declare every exchange, queue and binding; idempotent, safe to run from many processes.

    `backend` is the resolved timer backend ("levels" or "plugin"), never "auto". Returns the
    work queues an earlier release declared with the arguments their policy holds now.
    """
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        public = await channel.declare_exchange(
            PUBLIC_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        legacy = await _declare_work_queues(channel, public)
        if backend == "plugin":
            await _declare_plugin(channel)
        else:
            await _declare_levels(channel, queue_type)
    return legacy
