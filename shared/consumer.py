"""One way to consume a work queue: ack after the effect is stored, retry what is transient,
dead-letter what can never succeed, and let the delivery limit stop a poison message."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from faststream import AckPolicy
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from faststream.rabbit.message import RabbitMessage

from shared.bus import Publisher, dead_letter
from shared.errors import Rejected
from shared.logging import get_logger
from shared.metrics import REJECTED
from shared.retry_policy import RETRY_PAUSES, TRANSIENT
from shared.topology import WorkQueue

log = get_logger("followups.consumer")


@dataclass(frozen=True)
class Incoming:
    body: bytes
    routing_key: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = None
    # The delivery may have been handled before: the broker redelivered it, or a transient
    # failure here runs the handler again. Either way its earlier run may have stopped between
    # a commit and the timers or events that follow it, and a handler looks for that.
    redelivered: bool = False

    @classmethod
    def from_rabbit(cls, message: RabbitMessage) -> Incoming:
        raw = message.raw_message
        return cls(
            body=message.body,
            routing_key=raw.routing_key or "",
            headers=dict(raw.headers or {}),
            message_id=raw.message_id,
            content_type=raw.content_type,
            redelivered=bool(raw.redelivered),
        )


Handler = Callable[[Incoming], Awaitable[None]]


async def undecoded(message: RabbitMessage) -> RabbitMessage:
    """Subscriber decoder: the handler gets the delivery itself, its body still bytes, for
    `consume` to validate and settle. FastStream's JSON decoding would fail on a malformed body
    before `consume` runs, leaving it unacked."""
    return message


def work_queue_subscriber(
    broker: RabbitBroker, queue: WorkQueue, *, prefetch: int
) -> Callable[[Callable[[RabbitMessage], Awaitable[None]]], Any]:
    """The one way a service subscribes to its work queue: manual acks, `prefetch` deliveries in
    flight, each handed over undecoded. The broker runs without FastDepends (`make_broker`), so
    the function receives exactly what `undecoded` returns."""
    return broker.subscriber(
        RabbitQueue(queue.name, queue_type=QueueType.QUORUM, declare=False),
        ack_policy=AckPolicy.MANUAL,
        channel=Channel(prefetch_count=prefetch),
        decoder=undecoded,
    )


async def consume(
    message: RabbitMessage, queue: WorkQueue, handler: Handler, publisher: Publisher
) -> None:
    """Run `handler` for one delivery and settle it (the subscriber uses AckPolicy.MANUAL)."""
    incoming = Incoming.from_rabbit(message)
    try:
        await _with_retries(handler, incoming)
    except Rejected as exc:
        await _reject(message, queue, incoming, exc, publisher)
    except asyncio.CancelledError:
        await message.nack(requeue=True)
        raise
    except Exception as exc:
        # Unknown failure: back to the queue; the delivery limit dead-letters a poison message.
        log.error(
            "handler failed; message returned to the queue",
            queue=queue.name,
            error=exc.__class__.__name__,
            routing_key=incoming.routing_key,
            exc_info=not isinstance(exc, TRANSIENT),
        )
        await _failed(message)
    else:
        await message.ack()


async def _reject(
    message: RabbitMessage,
    queue: WorkQueue,
    incoming: Incoming,
    rejected: Rejected,
    publisher: Publisher,
) -> None:
    """Ack a rejected message once its dead-letter copy is confirmed. Without the copy it goes
    back to the queue: a delivery left unsettled would hold a prefetch slot until the channel
    closes, and the delivery limit still ends a message whose copy never gets through."""
    log.warning(
        "message rejected to the dead-letter queue",
        queue=queue.name,
        rule=rejected.rule,
        reason=rejected.detail,
        routing_key=incoming.routing_key,
    )
    try:
        await dead_letter(
            publisher,
            dead_letter_queue=queue.dead_letter_queue,
            body=incoming.body,
            headers=dict(incoming.headers),
            rule=rejected.rule,
            detail=rejected.detail,
            source_routing_key=incoming.routing_key,
        )
    except asyncio.CancelledError:
        await message.nack(requeue=True)
        raise
    except Exception as exc:
        log.error(
            "dead-letter copy failed; message returned to the queue",
            queue=queue.name,
            rule=rejected.rule,
            error=exc.__class__.__name__,
            routing_key=incoming.routing_key,
        )
        await _failed(message)
        return
    REJECTED.labels(queue.name, rejected.rule).inc()
    await message.ack()


async def _failed(message: RabbitMessage) -> None:
    """Back to the queue as a failed attempt. RabbitMQ 4.3 counts only those toward the delivery
    limit, and from 0-9-1 only basic.reject makes one (a basic.nack requeue, as on shutdown, is
    a plain return); earlier versions count every return."""
    await message.reject(requeue=True)


async def _with_retries(handler: Handler, incoming: Incoming) -> None:
    for pause in (*RETRY_PAUSES, None):
        try:
            await handler(incoming)
            return
        except TRANSIENT as exc:
            if pause is None:
                raise
            log.warning(
                "transient failure; trying again", error=exc.__class__.__name__, pause_seconds=pause
            )
            await asyncio.sleep(pause)
            incoming = replace(incoming, redelivered=True)
