"""Turning what the webhook receiver and the samplers saw into a row of the report."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bench.probes import Sampler
from bench.progress import Tracker
from bench.report import Row
from bench.stats import call_split, duplicates, spread, tail, tail_by_second
from testbed.webhook_process import RemoteWebhookReceiver


@dataclass(frozen=True)
class Delivery:
    followup_id: int
    key: str
    received_at: float  # epoch seconds
    scheduled_at: float  # epoch seconds


async def deliveries(receiver: RemoteWebhookReceiver) -> list[Delivery]:
    await receiver.refresh()
    found = []
    for call in list(receiver.calls):
        body = call.json
        found.append(
            Delivery(
                followup_id=int(body["followup_id"]),
                key=call.headers.get("idempotency-key", ""),
                received_at=call.received_at,
                scheduled_at=datetime.fromisoformat(body["scheduled_time"]).timestamp(),
            )
        )
    return found


def first_calls(found: list[Delivery]) -> list[Delivery]:
    first: dict[int, Delivery] = {}
    for delivery in sorted(found, key=lambda d: d.received_at):
        first.setdefault(delivery.followup_id, delivery)
    return list(first.values())


def fill_sends(row: Row, found: list[Delivery]) -> list[Delivery]:
    """Sent, duplicates, early and lateness (webhook receive time − scheduled_time)."""
    first = first_calls(found)
    row.sent = len(first)
    dup = duplicates((d.followup_id, d.key) for d in found)
    row.duplicate_keys = dup.different_keys
    row.repeated_calls = dup.repeated_calls
    row.early = sum(1 for d in found if d.received_at < d.scheduled_at)
    row.lateness_ms = spread([(d.received_at - d.scheduled_at) * 1000 for d in first])
    row.extra["lateness_by_second"] = tail_by_second(
        (d.scheduled_at, (d.received_at - d.scheduled_at) * 1000) for d in first
    )
    return first


def fill_resources(row: Row, sampler: Sampler) -> None:
    row.rss_peak_mb = {
        name: round(trace.rss_peak, 1)
        for name, trace in sampler.traces.items()
        if trace.rss_peak is not None
    }
    row.service_cpu_s = {name: round(trace.cpu, 2) for name, trace in sampler.traces.items()}
    row.broker_cpu_s = round(sampler.broker.seconds, 2)
    row.db_cpu_s = round(sampler.database.seconds, 2)
    row.db_cpu_services_s = round(sampler.database_ours.seconds, 2)
    if sampler.machine_busy_fraction is not None:
        row.machine_busy_pct = round(sampler.machine_busy_fraction * 100, 1)
    row.duration_s = round(sampler.stopped_at - sampler.started_at, 1)
    row.extra["bench_process_cpu_s"] = round(sampler.bench_cpu, 2)
    row.extra["load_average_1m"] = [
        round(sampler.load_average_start, 2),
        round(sampler.load_average_end, 2),
    ]
    if sampler.broker_restarted:
        row.notes.append(
            "the broker restarted during this run (someone else's?): figures disturbed"
        )


def cpu_seconds_total(row: Row) -> float:
    """Everything on the machine that works for the follow-ups: the services, the broker node,
    every PostgreSQL process and the bench process (load, webhook receiver, model stand-in)."""
    return (
        sum(row.service_cpu_s.values())
        + (row.broker_cpu_s or 0.0)
        + (row.db_cpu_s or 0.0)
        + float(row.extra.get("bench_process_cpu_s", 0.0))
    )


def fill_cpu_per_followup(row: Row, followups: int) -> None:
    """Milliseconds of CPU per follow-up over its whole life in the scenario, and each part's."""
    if followups <= 0 or row.duration_s is None:
        return
    row.cpu_ms_per_followup = round(cpu_seconds_total(row) * 1000 / followups, 2)
    parts = {
        **row.service_cpu_s,
        "broker": row.broker_cpu_s or 0.0,
        "postgresql": row.db_cpu_s or 0.0,
        "bench process": float(row.extra.get("bench_process_cpu_s", 0.0)),
    }
    row.extra["cpu_ms_per_followup"] = {
        name: round(seconds * 1000 / followups, 2) for name, seconds in parts.items()
    }


async def wait_for_calls(
    receiver: RemoteWebhookReceiver,
    expected: int,
    deadline: float,
    tracker: Tracker,
    abort: asyncio.Task[Any] | None = None,
) -> bool:
    """Until `expected` calls arrived or the (epoch) deadline passed; True when all came. A
    failed `abort` task (the load publishing alongside) ends the wait with its error."""
    await receiver.refresh()
    while len(receiver.calls) < expected and time.time() < deadline:
        if abort is not None and abort.done() and abort.exception() is not None:
            await abort
        tracker.update(len(receiver.calls), "webhook calls")
        await asyncio.sleep(0.1)
        await receiver.refresh()
    tracker.update(len(receiver.calls), "webhook calls")
    return len(receiver.calls) >= expected


async def count_rows(pool: asyncpg.Pool, after_id: int) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM contractor_followup_schedules WHERE id > $1", after_id
    )
    return count


async def max_id(pool: asyncpg.Pool) -> int:
    value: int = await pool.fetchval(
        "SELECT coalesce(max(id), 0) FROM contractor_followup_schedules"
    )
    return value


async def wait_for_rows(
    pool: asyncpg.Pool,
    after_id: int,
    expected: int,
    deadline: float,
    tracker: Tracker,
    interval: float = 0.05,
) -> float | None:
    """Polls the table until `expected` rows past `after_id` exist; returns the epoch time the
    last one was seen, or None if the deadline came first."""
    while time.time() < deadline:
        count = await count_rows(pool, after_id)
        tracker.update(count, "rows")
        if count >= expected:
            return time.time()
        await asyncio.sleep(interval)
    return None


async def text_sources(pool: asyncpg.Pool, after_id: int) -> dict[str, int]:
    rows = await pool.fetch(
        """SELECT coalesce(text_source, 'none') || ':' || coalesce(text_fallback_reason, '-') AS k,
                  count(*) AS n
           FROM contractor_followup_schedules WHERE id > $1 GROUP BY 1 ORDER BY 1""",
        after_id,
    )
    return {row["k"]: row["n"] for row in rows}


async def statuses(pool: asyncpg.Pool, after_id: int) -> dict[str, int]:
    rows = await pool.fetch(
        """SELECT status, count(*) AS n FROM contractor_followup_schedules
           WHERE id > $1 GROUP BY 1 ORDER BY 1""",
        after_id,
    )
    return {row["status"]: row["n"] for row in rows}


async def fill_call_split(
    row: Row, pool: asyncpg.Pool, after_id: int, first: list[Delivery]
) -> None:
    """Each first call's lateness split at its start as the dispatcher recorded it (the
    database's clock, the receiver's on the same machine): the part before the call, and the
    call itself up to the receiver's stamp."""
    rows = await pool.fetch(
        """SELECT id, extract(epoch FROM webhook_started_at)::float8 AS started
           FROM contractor_followup_schedules
           WHERE id > $1 AND webhook_started_at IS NOT NULL""",
        after_id,
    )
    started = {row["id"]: row["started"] for row in rows}
    row.extra["lateness_split"] = call_split(
        (d.scheduled_at, started[d.followup_id], d.received_at)
        for d in first
        if d.followup_id in started
    )


async def claim_lateness(pool: asyncpg.Pool, after_id: int) -> dict[str, float | None]:
    """When each follow-up's first claim was recorded, against its scheduled_time (negative:
    ahead of it, as the dispatch margin intends). A late claim means the send timer, or the
    dispatcher's intake, was late: the time was lost before the dispatcher could wait."""
    rows = await pool.fetch(
        """SELECT extract(epoch FROM min(t.at) - f.scheduled_time) * 1000 AS late_ms
           FROM contractor_followup_schedules AS f
           JOIN followup_transitions AS t
             ON t.followup_id = f.id AND t.stage = 'dispatcher' AND t.to_status = 'sending'
           WHERE f.id > $1
           GROUP BY f.id, f.scheduled_time""",
        after_id,
    )
    return tail([float(row["late_ms"]) for row in rows])
