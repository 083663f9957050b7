"""Publishing on the broker: lifecycle events, raw timer messages and dead-letter copies."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.exceptions
from faststream.rabbit import Channel, RabbitBroker

from shared.errors import RetryLater
from shared.metrics import PUBLISHED, destination_label
from shared.schemas import LifecycleEvent
from shared.topology import DEAD_LETTER_EXCHANGE, PUBLIC_EXCHANGE

JSON = "application/json"
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


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
    """The consuming side of a service; publishing goes through `AmqpPublisher`. The broker's
    own publishes (tests) wait for the confirm and fail loudly when nothing routes them."""
    return RabbitBroker(
        url,
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        logger=logger,
        # "Received"/"Processed" for every message: debug detail, not the operator's log.
        log_level=logging.DEBUG,
        graceful_timeout=15.0,
        # Subscribers take the delivery as it is (`work_queue_subscriber`); FastDepends would
        # resolve that argument for every message in a worker thread.
        apply_types=False,
    )


# A publish the broker neither confirms nor refuses in this time (flow control, a partition)
# fails, and the handler's retry takes over.
PUBLISH_TIMEOUT_SECONDS = 30.0


class AmqpPublisher:
    """Persistent, confirmed publishes on a connection of the publisher's own (aio-pika, robust:
    it reconnects by itself). A `mandatory` publish that nothing routes raises.

    Apart from the consumer's connection, the broker's flow control on publishing never holds
    up the consumer's acks; and bypassing FastStream's publish path halves what a publish costs
    in this process (a third of the scheduler's CPU went there)."""

    def __init__(self, url: str, *, name: str = "cli") -> None:
        """`name`: the service, in metrics and in the broker's list of connections."""
        self._url = url
        self._name = name
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def connect(self) -> None:
        connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": f"followups-{self._name} (publishing)"},
        )
        try:
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channel = None

    async def __aenter__(self) -> AmqpPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def is_connected(self) -> bool:
        # A robust connection that lost its link is not closed, only waiting to reconnect; and
        # it says it is connected again a moment before it has reopened its channels.
        return (
            self._connection is not None
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

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
        if self._channel is None:
            raise RuntimeError("the publisher is not connected: call connect() first")
        # The frame's properties are built here and the publish goes straight to the channel's
        # AMQP layer: aio-pika's message and exchange objects around it cost a fifth of each
        # publish's CPU, and the scheduler's intake is bound by its publishes.
        properties = aiormq.spec.Basic.Properties(
            content_type=JSON,
            delivery_mode=PERSISTENT,
            headers=headers,
            priority=priority,
            timestamp=datetime.now(UTC),
        )
        try:
            if self._channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("the publishing channel is closed")
            # On a robust connection this waits while it reconnects.
            channel = await self._channel.get_underlay_channel()
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except aiormq.exceptions.PublishError:
            # Returned unroutable: a binding is missing, which waiting does not mend.
            raise
        except (
            aiormq.exceptions.DeliveryError,
            aiormq.exceptions.ChannelInvalidStateError,
            TimeoutError,
        ) as exc:
            # Refused (a full queue's reject-publish), unconfirmed in time, or a channel between
            # reconnects: the same publish may well go through in a moment.
            raise RetryLater(
                f"the broker did not take a publish to {destination_label(exchange, routing_key)}"
                f" ({type(exc).__name__})"
            ) from exc
        PUBLISHED.labels(self._name, destination_label(exchange, routing_key)).inc()


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
