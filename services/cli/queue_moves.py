"""`followups declare --migrate-queues`: redeclare a work queue that an earlier release declared
with the x-arguments its policy holds now, keeping every message (README: Queue policies).

A queue's arguments can't change in place, so the queue is emptied into a holding queue and
declared again. The holding queue takes the work queue's bindings first, so nothing published or
fired by a timer meanwhile is lost; each step can be run again after a crash, and the next run
picks up from the holding queue. Messages are moved with publisher confirms and acked only once
the copy is confirmed: a crash may leave a copy twice, which the handlers drop as a duplicate
(idempotency keys, timer versions), never none. Messages that arrive during the move may be
handled before older ones; no handler depends on their order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared.policies import Management, moved_arguments
from shared.topology import WORK_QUEUES, WorkQueue

HOLDING_SUFFIX = ".moving"
# Drain, look, delete once empty: a few rounds for what arrives while draining.
DELETE_ATTEMPTS = 10
# The broker's own headers: the new queue counts its deliveries afresh.
_DROPPED_HEADERS = ("x-delivery-count",)


class MoveRefused(Exception):
    """The queue can't be moved now; the message says what to do first."""


@dataclass(frozen=True)
class QueueState:
    work: WorkQueue
    legacy_arguments: tuple[str, ...]  # empty: declared as this release declares it
    exists: bool
    holding: bool  # a holding queue of an earlier, unfinished move exists

    @property
    def needs_move(self) -> bool:
        return bool(self.legacy_arguments) or self.holding


def holding_queue(work: WorkQueue) -> str:
    return f"{work.name}{HOLDING_SUFFIX}"


async def queue_states(management: Management) -> list[QueueState]:
    states = []
    for work in WORK_QUEUES:
        info = await management.queue(work.name)
        arguments = (info or {}).get("arguments") or {}
        states.append(
            QueueState(
                work,
                tuple(moved_arguments(arguments)),
                exists=info is not None,
                holding=await management.queue(holding_queue(work)) is not None,
            )
        )
    return states


def _copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    # Without user_id: the broker checks it against the publishing connection's user.
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _DROPPED_HEADERS}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def _drain(channel: AbstractChannel, source: AbstractQueue, target: str) -> int:
    moved = 0
    while (message := await source.get(no_ack=False, fail=False)) is not None:
        await channel.default_exchange.publish(_copy(message), routing_key=target, mandatory=True)
        await message.ack()
        moved += 1
    return moved


def _bindings(found: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    # The default exchange's binding is every queue's own; it can't be made or removed.
    return [
        (b["source"], b["routing_key"], dict(b.get("arguments") or {}))
        for b in found
        if b["source"]
    ]


async def _empty_into(connection: aio_pika.abc.AbstractConnection, source: str, target: str) -> int:
    """Move every message of `source` into `target`, then delete `source`. It is bound to no
    exchange by now, so only a publish to its own name (`followups dlq replay`) could still
    reach it: don't replay during a move. Quorum queues can't be deleted if-empty or
    if-unused, so both are checked just before."""
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        moved = 0
        for _ in range(DELETE_ATTEMPTS):
            queue = await channel.declare_queue(source, passive=True)
            if queue.declaration_result.consumer_count:
                raise MoveRefused(f"{source} got a consumer during the move: stop it, run again")
            if not queue.declaration_result.message_count:
                await queue.delete(if_unused=False, if_empty=False)
                return moved
            moved += await _drain(channel, queue, target)
    raise MoveRefused(f"{source} did not stay empty long enough to be deleted; run it again")


async def move_queue(url: str, management: Management, state: QueueState) -> int:
    """Redeclare one work queue as this release declares it; returns the messages it got back
    from the holding queue."""
    work = state.work
    holding = holding_queue(work)
    if not state.needs_move:
        return 0
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        if state.legacy_arguments:
            queue = await channel.declare_queue(work.name, passive=True)
            consumers = queue.declaration_result.consumer_count
            if consumers:
                raise MoveRefused(
                    f"{work.name} has {consumers} consumer(s): stop the services first (its "
                    "messages wait in the broker meanwhile, and timers keep firing into it)"
                )
            kept = await channel.declare_queue(
                holding, durable=True, arguments={"x-queue-type": "quorum"}
            )
            bindings = _bindings(await management.bindings(work.name))
            # Bound to both for a moment: a message may be copied twice, never lost.
            for source, key, arguments in bindings:
                await kept.bind(source, routing_key=key, arguments=arguments)
            for source, key, arguments in bindings:
                await queue.unbind(source, routing_key=key, arguments=arguments)
            await _empty_into(connection, work.name, holding)
        new = await channel.declare_queue(work.name, durable=True, arguments=work.arguments)
        kept = await channel.declare_queue(holding, passive=True)
        bindings = _bindings(await management.bindings(holding))
        for source, key, arguments in bindings:
            await new.bind(source, routing_key=key, arguments=arguments)
        for source, key, arguments in bindings:
            await kept.unbind(source, routing_key=key, arguments=arguments)
        return await _empty_into(connection, holding, work.name)
