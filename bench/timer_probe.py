"""`--scenario timerwork`: how many times one timer enters a queue on its way, for a delay of
20 s and of 30 days, through the services' own `Timer` (levels) in vhosts of its own.

The 20 s timer is measured: armed on the declared topology (classic timer queues, whose
`next_seq_id` counts every message that entered them; the route is the same for either queue
type) and counted from the broker's statistics once it reached its work queue. Any delay, 30 days
included, is also walked without waiting: in a second vhost every timer queue is declared again
without its TTL (same name, same bindings), the timer is armed, and each hop is played by taking
the message from the queue it landed in and publishing it, as the broker's dead-lettering would,
to that queue's dead-letter exchange with its routing key, until a work queue holds it. The
broker routes every step, so the walk follows whatever topology the services declare; the two
counts agree for 20 s (the row says so), and the walk also adds up the TTLs it passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aio_pika

from bench.broker_stats import (
    TIMER_PREFIX,
    WORK_QUEUES,
    management_get,
    settled_queues,
    timer_work,
    vhost_queues,
)
from bench.progress import Progress
from bench.report import Row
from shared.bus import AmqpPublisher
from shared.settings import DelayBackend
from shared.timers import make_timer
from shared.topology import declare_topology
from testbed.infra import broker_node, rabbitmqctl

DESTINATION = WORK_QUEUES[0]
MEASURED = timedelta(seconds=20)
WALKED = (timedelta(seconds=20), timedelta(days=30))
BODY = b'{"probe": "timerwork"}'


@contextlib.asynccontextmanager
async def scratch_vhost(label: str) -> AsyncIterator[str]:
    name = f"followups_{label}_{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", name)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", name, "guest", *[".*"] * 3)
        url = broker_node().vhost_url(name)
        await declare_topology(url, backend="levels", queue_type="classic")
        yield name
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", name)


def _url(vhost: str) -> str:
    return broker_node().vhost_url(vhost)


async def _arm(vhost: str, delay: timedelta) -> datetime:
    fire_at = datetime.now(UTC) + delay
    async with AmqpPublisher(_url(vhost), name="bench-probe") as publisher:
        await make_timer(DelayBackend.LEVELS, publisher).arm(DESTINATION, BODY, fire_at)
    return fire_at


async def measure(vhost: str, delay: timedelta, progress: Progress) -> dict[str, Any]:
    """Arms one timer and waits for it in its work queue; what the broker counted."""
    connection = await aio_pika.connect(_url(vhost))
    async with connection:
        channel = await connection.channel()
        fire_at = await _arm(vhost, delay)
        deadline = fire_at + timedelta(seconds=30)
        arrived = None
        with progress.track(f"timerwork: one {delay.total_seconds():.0f} s timer", 1) as tracker:
            while datetime.now(UTC) < deadline:
                queue = await channel.declare_queue(DESTINATION, passive=True)
                if queue.declaration_result.message_count:
                    arrived = datetime.now(UTC)
                    break
                await asyncio.sleep(0.02)
            tracker.update(1 if arrived else 0)
    work = timer_work(await settled_queues(vhost))
    return {
        "delay_s": delay.total_seconds(),
        "arrived": arrived is not None,
        # Polled every 20 ms: an upper bound on how late the broker handed it over.
        "arrived_after_instant_ms": (
            round((arrived - fire_at).total_seconds() * 1000, 1) if arrived else None
        ),
        "entries": work.total,
        "publishes": work.timer_publishes,
        "dead_letterings": work.hops,
        "exact": work.exact,
    }


@dataclass(frozen=True)
class Hop:
    ttl_ms: int
    exchange: str
    routing_key: str | None  # None: the message's own


def _hops(vhost: str) -> dict[str, Hop]:
    return {
        q["name"]: Hop(
            int(q["arguments"]["x-message-ttl"]),
            str(q["arguments"].get("x-dead-letter-exchange", "")),
            q["arguments"].get("x-dead-letter-routing-key"),
        )
        for q in vhost_queues(vhost)
        if str(q["name"]).startswith(TIMER_PREFIX) and "x-message-ttl" in q["arguments"]
    }


async def _without_ttl(channel: aio_pika.abc.AbstractChannel, vhost: str, name: str) -> None:
    """The same queue, bindings and all, but nothing expires: the walk moves the message."""
    path = f"queues/{quote(vhost, safe='')}/{quote(name, safe='')}/bindings"
    bindings = [b for b in await asyncio.to_thread(management_get, path) if b["source"]]
    await channel.queue_delete(name)
    queue = await channel.declare_queue(name, durable=True)
    for binding in bindings:
        await queue.bind(
            binding["source"],
            routing_key=binding["routing_key"],
            arguments=binding.get("arguments") or None,
        )


async def walk(vhost: str, delay: timedelta, limit: int = 200) -> dict[str, Any]:
    hops = await asyncio.to_thread(_hops, vhost)
    connection = await aio_pika.connect(_url(vhost))
    async with connection:
        channel = await connection.channel()
        for name in hops:
            await _without_ttl(channel, vhost, name)
        queues = {
            name: await channel.get_queue(name, ensure=False) for name in [*hops, *WORK_QUEUES]
        }
        fire_at = await _arm(vhost, delay)
        path: list[str] = []
        waited = 0
        for _ in range(limit):
            found = None
            for name, queue in queues.items():
                message = await queue.get(no_ack=True, fail=False)
                if message is not None:
                    found = (name, message)
                    break
            if found is None:
                raise RuntimeError(f"the timer was lost after {path}")
            name, message = found
            path.append(name)
            if name not in hops:
                break
            hop = hops[name]
            waited += hop.ttl_ms
            exchange = await channel.get_exchange(hop.exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(message.body, headers=message.headers),
                routing_key=hop.routing_key or message.routing_key or "",
            )
        else:
            raise RuntimeError(f"no work queue after {limit} hops: {path[:10]}…")
    return {
        "delay_s": delay.total_seconds(),
        "entries": len(path),
        "path": path,
        "ttl_total_ms": waited,
        "delay_asked_ms": round(delay.total_seconds() * 1000),
        "armed_for": fire_at.isoformat(),
    }


async def timerwork(progress: Progress) -> Row:
    row = Row("timerwork", "levels", expected=1 + len(WALKED))
    started = time.monotonic()
    async with scratch_vhost("probe") as vhost:
        measured = await measure(vhost, MEASURED, progress)
    walked = []
    for delay in WALKED:
        async with scratch_vhost("walk") as vhost:
            walked.append(await walk(vhost, delay))
    row.sent = int(measured["arrived"]) + len(walked)
    row.extra["measured"] = measured
    row.extra["walked"] = walked
    row.duration_s = round(time.monotonic() - started, 1)
    row.notes.append(
        f"one 20 s timer, measured: {measured['entries']} queue entries "
        f"({measured['publishes']} publish + {measured['dead_letterings']} dead-letterings), "
        f"in its work queue {measured['arrived_after_instant_ms']} ms after its instant"
    )
    for found in walked:
        row.notes.append(
            f"one {_span(found['delay_s'])} timer, walked: {found['entries']} queue entries, "
            f"TTLs passed {found['ttl_total_ms']:,} ms of {found['delay_asked_ms']:,} asked"
        )
    if walked and measured["entries"] != walked[0]["entries"]:
        row.notes.append("the walk and the measurement disagree for 20 s: the walk is not valid")
    return row


def _span(seconds: float) -> str:
    return f"{seconds / 86400:g}-day" if seconds >= 86400 else f"{seconds:g} s"
