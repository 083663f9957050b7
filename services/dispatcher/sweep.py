"""The repair sweep: a safety net that re-arms follow-ups whose timer was lost.

Normally every follow-up fires from its broker timer and the sweep finds nothing. If the broker
loses timers (the delayed-message plugin keeps one copy on one node; a purge; a disaster), rows
whose send should have happened more than the grace period ago are armed again, so every
follow-up is still delivered, late by at most the sweep interval plus the grace. One dispatcher
replica at a time sweeps: it holds a PostgreSQL advisory lock on a connection of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from shared.db import CONNECTION_ERRORS
from shared.logging import get_logger
from shared.pipeline import arm_dispatch, arm_followup
from shared.store import FollowupStore
from shared.timers import Clock, Timer

log = get_logger("followups.sweep")

SWEEP_LOCK = 0x73776565  # advisory lock key: one active sweeper in the fleet


@dataclass(frozen=True)
class SweepReport:
    dispatch_rearmed: int
    personalize_rearmed: int


async def sweep_once(
    store: FollowupStore, timer: Timer, clock: Clock, grace: timedelta, lead: timedelta
) -> SweepReport:
    overdue = await store.overdue(grace)
    for row in overdue:
        await arm_dispatch(timer, row, clock(), row.attempts + 1)
    unprepared = await store.unprepared(grace, lead)
    for row in unprepared:
        await arm_followup(timer, row, lead, timedelta(0))
    return SweepReport(len(overdue), len(unprepared))


async def sweep_forever(
    dsn: str,
    store: FollowupStore,
    timer: Timer,
    clock: Clock,
    *,
    interval: timedelta,
    grace: timedelta,
    lead: timedelta,
) -> None:
    while True:
        try:
            connection = await asyncpg.connect(dsn)
        except CONNECTION_ERRORS as exc:
            log.warning("sweep cannot reach the database", error=exc.__class__.__name__)
            await asyncio.sleep(interval.total_seconds())
            continue
        try:
            await _lead_while_locked(connection, store, timer, clock, interval, grace, lead)
        except CONNECTION_ERRORS as exc:
            log.warning("sweep lost its database connection", error=exc.__class__.__name__)
        finally:
            if not connection.is_closed():
                await connection.close()
        await asyncio.sleep(interval.total_seconds())


async def _lead_while_locked(
    connection: asyncpg.Connection,
    store: FollowupStore,
    timer: Timer,
    clock: Clock,
    interval: timedelta,
    grace: timedelta,
    lead: timedelta,
) -> None:
    while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK):  # noqa: ASYNC110 (polls another process's lock)
        await asyncio.sleep(interval.total_seconds())
    log.info("this dispatcher runs the repair sweep", interval_seconds=interval.total_seconds())
    while True:
        report = await sweep_once(store, timer, clock, grace, lead)
        if report.dispatch_rearmed or report.personalize_rearmed:
            log.warning(
                "repair sweep re-armed lost timers",
                dispatch=report.dispatch_rearmed,
                personalize=report.personalize_rearmed,
            )
        await asyncio.sleep(interval.total_seconds())
        await connection.execute("SELECT 1")  # the lock lives as long as this connection
