"""The repair sweep: a safety net that re-arms follow-ups whose timer was lost.

Normally every follow-up fires from its broker timer and the sweep finds nothing. If the broker
loses timers (the delayed-message plugin keeps one copy on one node; a purge; a disaster), rows
whose send should have happened more than the grace period ago are armed again, so every
follow-up is still delivered, late by at most the sweep interval plus the grace. One dispatcher
replica at a time sweeps: it holds a PostgreSQL advisory lock on a connection of its own.

Every replica makes a pass each interval: the active one sweeps, a standby tries the lock and,
finding it held, has nothing to do. Each completed pass beats `heartbeat`, so a sweep that stops
passing (an error on every pass, a query that hangs) turns the dispatcher's readiness red.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg

from shared.db import CONNECTION_ERRORS
from shared.health import Heartbeat
from shared.locks import REPAIR_SWEEP
from shared.logging import get_logger
from shared.metrics import SWEEP_LAST_PASS
from shared.pipeline import arm_dispatch, arm_preparation
from shared.rows import SELECT, Followup, pending
from shared.timers import Clock, Timer

log = get_logger("followups.sweep")

# Passes a sweep may miss before its dispatcher is unready: one slow or failed pass is no alarm.
MISSED_PASSES_ALLOWED = 3


def sweep_heartbeat(interval: timedelta) -> Heartbeat:
    return Heartbeat(max_age=MISSED_PASSES_ALLOWED * interval.total_seconds())


class SweepQueries:
    """The rows the sweep re-arms."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def overdue(self, grace: timedelta, limit: int = 500) -> list[Followup]:
        """Rows whose send timer should have fired more than `grace` ago: scheduled ones past
        their (next attempt) time, and sending ones whose lease ran out."""
        records = await self._pool.fetch(
            # A range on scheduled_time over the pending index (now(), not the volatile
            # clock_timestamp(), so the index can bound it): a sending row's lease ends well
            # after its scheduled_time, so both kinds lie below the bound.
            f"""{SELECT}
                WHERE {pending("contractor_followup_schedules")}
                  AND scheduled_time < now() - $1::interval
                  AND CASE WHEN status = 'scheduled'
                           THEN coalesce(next_attempt_at, scheduled_time)
                                < now() - $1::interval
                           ELSE lease_until < now() - $1::interval END
                ORDER BY scheduled_time LIMIT $2""",
            grace,
            limit,
        )
        return [Followup.from_record(r) for r in records]

    async def unprepared(
        self, grace: timedelta, lead: timedelta, limit: int = 500
    ) -> list[Followup]:
        """Scheduled rows whose text should have been prepared more than `grace` ago and whose
        send is still far enough ahead for preparing it to be worth it."""
        records = await self._pool.fetch(
            f"""{SELECT}
                -- the pending condition as the partial index has it, so the index serves
                WHERE {pending("contractor_followup_schedules")} AND status = 'scheduled'
                  AND ai_should_personalize
                  AND prepared_version IS DISTINCT FROM version
                  AND scheduled_time < now() - $1::interval + $2::interval
                  AND scheduled_time > now() + $1::interval
                ORDER BY scheduled_time LIMIT $3""",
            grace,
            lead,
            limit,
        )
        return [Followup.from_record(r) for r in records]


@dataclass(frozen=True)
class SweepReport:
    dispatch_rearmed: int
    personalize_rearmed: int


async def sweep_once(
    store: SweepQueries, timer: Timer, clock: Clock, grace: timedelta, lead: timedelta
) -> SweepReport:
    overdue = await store.overdue(grace)
    for row in overdue:
        await arm_dispatch(timer, row, clock(), row.attempts + 1)
    unprepared = await store.unprepared(grace, lead)
    for row in unprepared:
        await arm_preparation(timer, row, lead)
    return SweepReport(len(overdue), len(unprepared))


@dataclass
class Sweeper:
    dsn: str
    store: SweepQueries
    timer: Timer
    clock: Clock
    interval: timedelta
    grace: timedelta
    lead: timedelta
    heartbeat: Heartbeat
    # A session of the sweeper's own: the advisory lock lives as long as it does.
    _session: asyncpg.Connection | None = field(default=None, init=False, repr=False)
    _leading: bool = field(default=False, init=False)

    async def run_forever(self) -> None:
        """A pass every interval until cancelled. A pass that fails, whatever the error, is
        logged and gives the lock up (another replica may take over), and the next pass starts
        over after the pause."""
        self.heartbeat.start()
        try:
            while True:
                try:
                    await self.pass_once()
                except Exception as exc:
                    # An outage is said in a line; anything else is a bug, with its traceback.
                    log.error(
                        "repair sweep pass failed; trying again after a pause",
                        error=exc.__class__.__name__,
                        exc_info=not isinstance(exc, CONNECTION_ERRORS),
                    )
                    await self._release()
                else:
                    self.heartbeat.beat()
                    SWEEP_LAST_PASS.set_to_current_time()
                await asyncio.sleep(self.interval.total_seconds())
        finally:
            await self._release()

    async def pass_once(self) -> SweepReport | None:
        """Sweep if this replica holds the lock or can take it now; None while another does."""
        if self._session is None or self._session.is_closed():
            self._session = await asyncpg.connect(self.dsn)
            self._leading = False
        if self._leading:
            await self._session.execute("SELECT 1")  # the session, and so the lock, still there
        else:
            self._leading = await self._session.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", *REPAIR_SWEEP
            )
            if not self._leading:
                return None
            log.info(
                "this dispatcher runs the repair sweep",
                interval_seconds=self.interval.total_seconds(),
            )
        report = await sweep_once(self.store, self.timer, self.clock, self.grace, self.lead)
        if report.dispatch_rearmed or report.personalize_rearmed:
            log.warning(
                "repair sweep re-armed lost timers",
                dispatch=report.dispatch_rearmed,
                personalize=report.personalize_rearmed,
            )
        return report

    async def _release(self) -> None:
        """Close the session, which releases the lock if it held it."""
        session, self._session, self._leading = self._session, None, False
        if session is not None and not session.is_closed():
            try:
                await session.close(timeout=5)
            except Exception:
                session.terminate()
