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
from shared.pipeline import arm_dispatch, arm_preparation
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
        await arm_preparation(timer, row, lead)
    return SweepReport(len(overdue), len(unprepared))


@dataclass(frozen=True)
class Sweeper:
    dsn: str
    store: FollowupStore
    timer: Timer
    clock: Clock
    interval: timedelta
    grace: timedelta
    lead: timedelta

    async def run_forever(self) -> None:
        """Try to become the fleet's sweeper; sweep while holding the lock; start over when the
        database connection is lost."""
        while True:
            try:
                connection = await asyncpg.connect(self.dsn)
            except CONNECTION_ERRORS as exc:
                log.warning("sweep cannot reach the database", error=exc.__class__.__name__)
            else:
                try:
                    await self._lead_while_locked(connection)
                except CONNECTION_ERRORS as exc:
                    log.warning("sweep lost its database connection", error=exc.__class__.__name__)
                finally:
                    if not connection.is_closed():
                        await connection.close()
            await asyncio.sleep(self.interval.total_seconds())

    async def _lead_while_locked(self, connection: asyncpg.Connection) -> None:
        pause = self.interval.total_seconds()
        # Polls a lock another process holds: no event to wait on.
        while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK):  # noqa: ASYNC110
            await asyncio.sleep(pause)
        log.info("this dispatcher runs the repair sweep", interval_seconds=pause)
        while True:
            report = await sweep_once(self.store, self.timer, self.clock, self.grace, self.lead)
            if report.dispatch_rearmed or report.personalize_rearmed:
                log.warning(
                    "repair sweep re-armed lost timers",
                    dispatch=report.dispatch_rearmed,
                    personalize=report.personalize_rearmed,
                )
            await asyncio.sleep(pause)
            await connection.execute("SELECT 1")  # the lock lives as long as this connection
