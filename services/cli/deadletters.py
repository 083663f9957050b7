"""Reading, replaying and purging dead-letter queues without losing a message.

Messages are taken with basic.get and held unacknowledged; whatever is not replayed goes back
to its queue (nack with requeue) when the operation ends, even when it fails half-way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared.errors import InvalidMessage
from shared.schemas import parse_inbound, parse_timer
from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX, WORK_QUEUES, WorkQueue

# Headers the broker or our dead-lettering added; a replayed message starts without them.
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    "x-delivery-count",
    "x-error-rule",
    "x-error-reason",
    "x-original-routing-key",
)


def resolve_queue(name: str) -> WorkQueue:
    """`scheduler`, `followups.scheduler.inbox` and `followups.scheduler.inbox.dlq` all work."""
    for work in WORK_QUEUES:
        short = work.name.split(".")[1]
        if name in (short, work.name, work.dead_letter_queue):
            return work
    known = ", ".join(w.dead_letter_queue for w in WORK_QUEUES)
    raise LookupError(f"no dead-letter queue {name!r}; choose from {known}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    headers: Mapping[str, Any]
    routing_key: str
    message_id: str | None
    content_type: str | None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        return cls(
            body=message.body,
            headers=dict(message.headers or {}),
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            content_type=message.content_type,
        )

    @property
    def _first_death(self) -> Mapping[str, Any]:
        deaths = self.headers.get("x-death") or []
        return deaths[0] if deaths and isinstance(deaths[0], Mapping) else {}

    @property
    def original_routing_key(self) -> str:
        """Where it was first published: our own header, else the broker's x-death record."""
        if "x-original-routing-key" in self.headers:
            return _text(self.headers["x-original-routing-key"])
        keys = self._first_death.get("routing-keys") or []
        return _text(keys[0]) if keys else self.routing_key

    @property
    def reason(self) -> str:
        if "x-error-rule" in self.headers:
            rule = _text(self.headers["x-error-rule"])
            return f"{rule}: {_text(self.headers.get('x-error-reason', ''))}"
        death = self._first_death
        if death:
            return f"{_text(death.get('reason', '?'))} in {_text(death.get('queue', '?'))}"
        return "unknown"

    def replay_headers(self) -> dict[str, Any]:
        return {k: v for k, v in self.headers.items() if k not in _DEATH_HEADERS}


def revalidate(work: WorkQueue, letter: DeadLetter) -> str | None:
    """None when the message would be accepted now; else why not (rule: detail)."""
    try:
        if work is SCHEDULER_INBOX:
            parse_inbound(letter.original_routing_key, letter.body, letter.content_type)
        else:
            parse_timer(letter.body)
    except InvalidMessage as exc:
        return f"{exc.rule}: {exc.detail}"
    return None


@dataclass
class Outcome:
    replayed: int = 0
    kept: int = 0
    reasons: dict[str, int] | None = None

    def keep(self, reason: str) -> None:
        self.kept += 1
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


GIVE_BACK_POLLS = 50
GIVE_BACK_PAUSE_SECONDS = 0.1


class DeadLetterQueue:
    """One work queue's dead-letter queue on an open channel."""

    def __init__(self, channel: AbstractChannel, work: WorkQueue, queue: AbstractQueue) -> None:
        self._channel = channel
        self.work = work
        self._queue = queue

    @property
    def depth(self) -> int:
        result = self._queue.declaration_result
        return int(result.message_count or 0)

    @property
    def consumers(self) -> int:
        return int(self._queue.declaration_result.consumer_count or 0)

    async def peek(
        self, limit: int, progress: Callable[[], None] = lambda: None
    ) -> list[DeadLetter]:
        """Up to `limit` messages from the head; all of them stay in the queue."""
        held: list[AbstractIncomingMessage] = []
        try:
            for _ in range(min(limit, self.depth)):
                message = await self._queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                held.append(message)
                progress()
            return [DeadLetter.of(m) for m in held]
        finally:
            await self._give_back(held)

    async def replay(
        self, *, limit: int, dry_run: bool, progress: Callable[[], None] = lambda: None
    ) -> Outcome:
        """Re-validate each message; republish the valid ones where they first went."""
        outcome = Outcome()
        held: list[AbstractIncomingMessage] = []
        public = await self._channel.get_exchange(PUBLIC_EXCHANGE, ensure=False)
        try:
            for _ in range(min(limit, self.depth)):
                message = await self._queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                progress()
                letter = DeadLetter.of(message)
                problem = revalidate(self.work, letter)
                if problem is not None or dry_run:
                    held.append(message)
                    if problem is not None:
                        outcome.keep(problem)
                    else:
                        outcome.replayed += 1
                    continue
                await self._republish(letter, public)
                await message.ack()
                outcome.replayed += 1
        finally:
            await self._give_back(held)
        return outcome

    async def _republish(self, letter: DeadLetter, public: aio_pika.abc.AbstractExchange) -> None:
        outgoing = aio_pika.Message(
            letter.body,
            headers=letter.replay_headers(),
            content_type=letter.content_type or "application/json",
            message_id=letter.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        if self.work is SCHEDULER_INBOX:
            # The scheduler reads the command from the routing key: publish it as it first came.
            await public.publish(outgoing, routing_key=letter.original_routing_key)
        else:
            await self._channel.default_exchange.publish(outgoing, routing_key=self.work.name)

    async def purge(self) -> int:
        result = await self._queue.purge()
        return int(result.message_count or 0)

    async def _give_back(self, held: list[AbstractIncomingMessage]) -> None:
        """Requeue what was held, then wait (a few seconds at most) until the queue counts it
        again: the broker requeues asynchronously, and a `replay` run right after a `list`
        must find every message where the `list` found it."""
        if not held:
            return
        expected = await self._ready() + len(held)
        for message in held:
            await message.nack(requeue=True)
        for _ in range(GIVE_BACK_POLLS):
            if await self._ready() >= expected:
                return
            await asyncio.sleep(GIVE_BACK_PAUSE_SECONDS)

    async def _ready(self) -> int:
        result = await self._queue.declare()
        return int(result.message_count or 0)


@asynccontextmanager
async def open_dead_letters(url: str, work: WorkQueue) -> AsyncIterator[DeadLetterQueue]:
    connection = await aio_pika.connect(url)
    async with connection:
        # Confirmed and mandatory: a replay nobody receives raises, and its original stays put.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(work.dead_letter_queue, passive=True)
        yield DeadLetterQueue(channel, work, queue)
