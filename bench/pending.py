"""Filling the system with follow-ups days ahead, and what that costs in memory.

`direct` writes the rows with set-based INSERTs (a transition row each, as the scheduler writes)
and arms their timers through the scheduler's own code path (`arm_followup`, with the services'
lead and dispatch margin), publishing with pipelined confirms: the same rows and timer messages
the scheduler would leave, about ten times faster.
`scheduler` publishes followup.requested and lets the scheduler store them, as in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from bench.broker_stats import TIMER_PREFIX
from bench.load import TEMPLATE, in_windows, publish_requests, request_body
from bench.measure import count_rows, max_id
from bench.probes import (
    backend_rss_mb,
    broker_reported_mb,
    broker_rss_mb,
    database_sizes,
    queue_figures,
    rss_mb,
)
from bench.progress import Progress
from bench.stack import Stack
from shared.bus import AmqpPublisher
from shared.pipeline import arm_followup
from shared.rows import Followup
from shared.settings import DelayBackend, Settings
from shared.timers import make_timer

BATCH = 20_000
# The steady scenario on top of the load publishes keys `pending-<i>`: the loaded follow-ups' keys
# must differ, or the scheduler takes those requests for repeats of loaded ones and ignores them.
LOADED_KEY_PREFIX = "pending-load-"
FIRST_DAY = 2  # pending follow-ups are spread over days 2 to 9 from now
SPAN_DAYS = 7

_INSERT_TEMPLATE = """
WITH made AS (
    INSERT INTO contractor_followup_schedules (
        contractor_id, scheduled_time, followup_type, message_template, idempotency_key,
        requested_by)
    SELECT ($3::bigint[])[1 + n % cardinality($3::bigint[])],
           $4::timestamptz + (n::float8 / $5) * $6::interval,
           'check_in', $7, 'key:' || $8::text || n, 'bench-pending'
    FROM generate_series($1::bigint, $2::bigint - 1) AS n
    RETURNING {columns}
), logged AS (
    INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
    SELECT id, 'scheduler', NULL, 'scheduled',
           jsonb_build_object('scheduled_time', scheduled_time)
    FROM made
)
SELECT {columns} FROM made
"""


def loaded_key(n: int) -> str:
    return f"{LOADED_KEY_PREFIX}{n}"


def _spread_start() -> datetime:
    return datetime.now(UTC) + timedelta(days=FIRST_DAY)


# Every column the services read, so each row comes back as the scheduler would hold it.
_INSERT = _INSERT_TEMPLATE.replace(
    "{columns}", ", ".join(field.name for field in dataclasses.fields(Followup))
)
# The services run with the default margin (the bench does not set DISPATCH_MARGIN_MS).
DISPATCH_MARGIN = timedelta(milliseconds=Settings.model_fields["dispatch_margin_ms"].default)


async def _arm_rows(url: str, backend: str, lead: float, rows: list[Followup], window: int) -> None:
    async with AmqpPublisher(url, name="bench") as publisher:
        timer = make_timer(DelayBackend(backend), publisher)
        jobs = [
            partial(arm_followup, timer, row, timedelta(seconds=lead), DISPATCH_MARGIN)
            for row in rows
        ]
        await in_windows(jobs, window)


def arm_rows(url: str, backend: str, lead: float, rows: list[Followup], window: int) -> None:
    """In a worker process: publishing is CPU-bound in the client, so it is spread over
    processes."""
    asyncio.run(_arm_rows(url, backend, lead, rows, window))


async def load_direct(
    stack: Stack, count: int, lead: float, window: int, progress: Progress
) -> dict[str, Any]:
    start = _spread_start()
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    workers = max(2, os.cpu_count() or 2)
    # Spawned, not forked: a fork would copy this process's running event loop and threads.
    with (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        progress.track("pending: rows and timers (direct)", count) as tracker,
    ):
        for first in range(0, count, BATCH):
            last = min(first + BATCH, count)
            records = await stack.pool.fetch(
                _INSERT,
                first,
                last,
                stack.contractor_ids,
                start,
                float(count),
                timedelta(days=SPAN_DAYS),
                TEMPLATE,
                LOADED_KEY_PREFIX,
            )
            rows = [Followup.from_record(record) for record in records]
            share = -(-len(rows) // workers)
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        pool,
                        arm_rows,
                        stack.rabbitmq_url,
                        stack.options.backend,
                        lead,
                        rows[i : i + share],
                        window,
                    )
                    for i in range(0, len(rows), share)
                )
            )
            tracker.update(last)
    return _loaded(count, "direct", time.monotonic() - started)


def _loaded(count: int, method: str, seconds: float) -> dict[str, Any]:
    return {
        "count": count,
        "method": method,
        "seconds": round(seconds, 1),
        "rows_per_second": count / seconds if seconds else None,
    }


async def load_through_scheduler(
    stack: Stack, count: int, lead: float, window: int, progress: Progress
) -> dict[str, Any]:
    base = await max_id(stack.pool)
    start = _spread_start()
    step = timedelta(days=SPAN_DAYS) / max(count, 1)
    ids = stack.contractor_ids
    started = time.monotonic()
    async with AmqpPublisher(stack.rabbitmq_url, name="bench") as publisher:
        with progress.track("pending: requests (through the scheduler)", count) as tracker:
            for first in range(0, count, BATCH):
                last = min(first + BATCH, count)
                bodies = [
                    request_body(loaded_key(n), ids[n % len(ids)], start + step * n)
                    for n in range(first, last)
                ]
                await publish_requests(publisher, bodies, window)
                tracker.update(await count_rows(stack.pool, base), "stored")
            while (stored := await count_rows(stack.pool, base)) < count:
                tracker.update(stored, "stored")
                await asyncio.sleep(0.5)
            tracker.update(count, "stored")
    return _loaded(count, "scheduler", time.monotonic() - started)


async def memory_snapshot(stack: Stack) -> dict[str, Any]:
    queues = queue_figures(stack.vhost)
    timers = {name: v for name, v in queues.items() if name.startswith(TIMER_PREFIX)}
    return {
        "at": datetime.now(UTC).isoformat(),
        "services_rss_mb": {
            name: round(rss_mb(pid) or 0.0, 1) for name, pid in stack.service_pids().items()
        },
        "broker_rss_mb": round(broker_rss_mb() or 0.0, 1),
        "broker_reported_mb": broker_reported_mb(),
        "timer_messages": sum(n for n, _ in timers.values()),
        "timer_queue_mb": round(sum(m for _, m in timers.values()) / 2**20, 1),
        "queues_mb": round(sum(m for _, m in queues.values()) / 2**20, 1),
        "database_mb": {k: round(v, 1) for k, v in (await database_sizes(stack.pool)).items()},
        "backend_rss_mb": round(await backend_rss_mb(stack.pool), 1),
    }
