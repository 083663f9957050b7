"""Publishing on the broker: lifecycle events, raw timer messages and dead-letter copies."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from faststream.rabbit import Channel, RabbitBroker

from shared.schemas import LifecycleEvent
from shared.topology import DEAD_LETTER_EXCHANGE, PUBLIC_EXCHANGE

JSON = "application/json"


class Publisher(Protocol):
    """The one thing handlers and timers need from the broker."""

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
        mandatory: bool = True,
    ) -> None: ...


def make_broker(url: str, *, logger: Any = None) -> RabbitBroker:
    """A broker whose publishes wait for the confirm and fail loudly when nothing routes them."""
    return RabbitBroker(
        url,
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        logger=logger,
        # "Received"/"Processed" for every message: debug detail, not the operator's log.
        log_level=logging.DEBUG,
        graceful_timeout=15.0,
    )


class BrokerPublisher:
    """Publisher on a connected FastStream broker: persistent JSON, confirmed."""

    def __init__(self, broker: RabbitBroker) -> None:
        self._broker = broker

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
        await self._broker.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            persist=True,
            mandatory=mandatory,
            content_type=JSON,
            priority=priority,
        )


async def publish_event(publisher: Publisher, event: LifecycleEvent) -> None:
    # Nobody may be listening to an event: unroutable is normal here, not an error.
    await publisher.publish(
        event.model_dump_json(exclude_none=True).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key=event.event,
        mandatory=False,
    )


async def dead_letter(
    publisher: Publisher,
    *,
    dead_letter_queue: str,
    body: bytes,
    headers: dict[str, Any],
    rule: str,
    detail: str,
    source_routing_key: str,
) -> None:
    """Park a copy of a rejected message with a readable reason (no personal data in it)."""
    await publisher.publish(
        body,
        exchange=DEAD_LETTER_EXCHANGE,
        routing_key=dead_letter_queue,
        headers={
            **{k: v for k, v in headers.items() if not k.startswith("x-error")},
            "x-error-rule": rule,
            "x-error-reason": detail[:500],
            "x-original-routing-key": source_routing_key,
        },
    )
