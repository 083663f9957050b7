"""Ending an occurrence, the same for the personalizer (skipped) and the dispatcher (skipped,
failed, cancelled, sent): its status and transition, the next occurrence of a recurring one in the
same transaction, armed only after the commit, then the events. Also the steps both services take
on a due timer: is it stale, is the action item done, the contractor's zone, the template."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from shared.bus import Publisher
from shared.calendar import zone_for
from shared.events import announce
from shared.logging import get_logger
from shared.rows import COLUMNS, SELECT, Followup, SendContext, get_followup
from shared.schemas import Status, TimerMessage
from shared.templates import render
from shared.timers import Clock
from shared.transitions import record_transition

log = get_logger("followups.occurrences")

_EVENTS = {
    Status.SENT: "followup.sent",
    Status.SKIPPED: "followup.skipped",
    Status.FAILED: "followup.failed",
    Status.CANCELLED: "followup.cancelled",
}


@dataclass(frozen=True)
class NextOccurrence:
    """The next occurrence of a recurring follow-up: its time and how to arm its timers."""

    scheduled_time: datetime
    arm: Callable[[Followup], Awaitable[None]]


@dataclass(frozen=True)
class Ending:
    """An occurrence ended in a transaction: the row (None when it had moved on) and the next
    occurrence, `created` now and so to arm once the transaction commits."""

    row: Followup | None
    following: Followup | None = None
    created: bool = False
    plan: NextOccurrence | None = None


# ---- the record ---------------------------------------------------------------------------


async def move(
    connection: asyncpg.Connection, current: Followup, scheduled_time: datetime, *, stage: str
) -> Followup:
    """Reschedule a pending row (locked by the caller) under a new version, as a fresh
    `scheduled` occurrence: no claim, no wait, no attempt time of the old one."""
    record = await connection.fetchrow(
        f"""UPDATE contractor_followup_schedules
            SET scheduled_time = $2, version = version + 1, status = 'scheduled',
                next_attempt_at = NULL, lease_until = NULL, deferred_until = NULL,
                deferred_reason = NULL, lateness_ms = NULL, webhook_started_at = NULL,
                claim_id = NULL, calling_since = NULL, waiting_since = NULL,
                reschedule_to = NULL, updated_at = now()
            WHERE id = $1
            RETURNING {COLUMNS}""",
        current.id,
        scheduled_time,
    )
    row = Followup.from_record(record)
    await record_transition(
        connection,
        row.id,
        stage,
        current.status,
        Status.SCHEDULED,
        {
            "rescheduled_from": current.scheduled_time.isoformat(),
            "scheduled_time": scheduled_time.isoformat(),
            "version": row.version,
        },
    )
    return row


async def _end(
    connection: asyncpg.Connection,
    row: Followup,
    status: Status,
    *,
    stage: str,
    reason: str,
    claim_id: UUID | None,
) -> Followup | None:
    """A pending row to a final status other than sent: a `scheduled` one, or with `claim_id`
    a `sending` one this claim owns. None when it had moved on."""
    record = await connection.fetchrow(
        f"""UPDATE contractor_followup_schedules
            SET status = $2, status_reason = $3, lease_until = NULL, updated_at = now(),
                calling_since = NULL, claim_id = NULL, waiting_since = NULL,
                version = version + CASE WHEN $2 = 'cancelled' THEN 1 ELSE 0 END,
                last_error = CASE WHEN $2 = 'failed' THEN $3 ELSE last_error END
            WHERE id = $1 AND CASE WHEN $4::uuid IS NULL THEN status = 'scheduled'
                                   ELSE status = 'sending' AND claim_id = $4 END
            RETURNING {COLUMNS}""",
        row.id,
        status,
        reason,
        claim_id,
    )
    if record is None:
        return None
    await record_transition(connection, row.id, stage, row.status, status, {"reason": reason})
    return Followup.from_record(record)


async def continue_series(
    connection: asyncpg.Connection, ended: Followup, plan: NextOccurrence | None, *, stage: str
) -> Ending:
    """Create (once) the next occurrence of a recurring row that just ended and link it. Its
    timers are for the caller to arm after the commit (`arm_next`)."""
    if plan is None:
        return Ending(ended)
    record = await connection.fetchrow(
        f"""INSERT INTO contractor_followup_schedules (
                contractor_id, action_item_id, event_id, scheduled_time, followup_type,
                message_template, message_tone, ai_should_personalize, ai_context_hints,
                skip_if_completed, is_recurring, recurrence_interval_days, idempotency_key,
                priority, requested_by, series_id, occurrence, prompt_variant)
            SELECT contractor_id, action_item_id, event_id, $2, followup_type,
                   message_template, message_tone, ai_should_personalize, ai_context_hints,
                   skip_if_completed, true, recurrence_interval_days,
                   'next:' || id, priority, requested_by, coalesce(series_id, id),
                   occurrence + 1, NULL
            FROM contractor_followup_schedules WHERE id = $1
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING {COLUMNS}""",
        ended.id,
        plan.scheduled_time,
    )
    if record is None:
        existing = await connection.fetchrow(
            f"{SELECT} WHERE idempotency_key = $1", f"next:{ended.id}"
        )
        return Ending(ended, Followup.from_record(existing), False, plan)
    following = Followup.from_record(record)
    await record_transition(
        connection,
        following.id,
        stage,
        None,
        Status.SCHEDULED,
        {"previous_occurrence": ended.id, "scheduled_time": plan.scheduled_time.isoformat()},
    )
    linked = await connection.fetchrow(
        f"""UPDATE contractor_followup_schedules SET next_occurrence_id = $2
            WHERE id = $1 RETURNING {COLUMNS}""",
        ended.id,
        following.id,
    )
    return Ending(Followup.from_record(linked), following, True, plan)


async def end_in(
    connection: asyncpg.Connection,
    row: Followup,
    status: Status,
    *,
    stage: str,
    reason: str,
    plan: NextOccurrence | None,
    claim_id: UUID | None,
) -> Ending:
    """End a pending occurrence (not sent) in the caller's transaction, and continue its series."""
    ended = await _end(connection, row, status, stage=stage, reason=reason, claim_id=claim_id)
    if ended is None:
        return Ending(None)
    return await continue_series(connection, ended, plan, stage=stage)


async def arm_next(ending: Ending) -> None:
    """Arm a committed new occurrence. Its row is the record: if the broker refuses now, the
    failure is logged, not raised (nothing of the commit is undone), and the repair sweep arms
    the occurrence once its timer is overdue."""
    if not ending.created or ending.plan is None or ending.following is None:
        return
    try:
        await ending.plan.arm(ending.following)
    except Exception as exc:
        log.warning(
            "next occurrence recorded but its timers not armed; the repair sweep will arm it",
            followup_id=ending.following.id,
            error=exc.__class__.__name__,
        )


class Ends(Protocol):
    """A service's repository that ends occurrences under its own stage name."""

    async def end(
        self,
        row: Followup,
        status: Status,
        *,
        reason: str,
        plan: NextOccurrence | None,
        claim_id: UUID | None = None,
    ) -> Ending: ...


class OccurrenceRecord:
    """The part of a service's repository that ends occurrences, in a transaction of its own."""

    def __init__(self, pool: asyncpg.Pool, stage: str) -> None:
        self._pool = pool
        self._stage = stage

    async def get(self, followup_id: int) -> Followup | None:
        return await get_followup(self._pool, followup_id)

    async def end(
        self,
        row: Followup,
        status: Status,
        *,
        reason: str,
        plan: NextOccurrence | None,
        claim_id: UUID | None = None,
    ) -> Ending:
        """End a follow-up that is not sent (failed, skipped): a `scheduled` one, or with
        `claim_id` a `sending` one this claim still owns; a recurring one continues."""
        async with self._pool.acquire() as connection, connection.transaction():
            ending = await end_in(
                connection,
                row,
                status,
                stage=self._stage,
                reason=reason,
                plan=plan,
                claim_id=claim_id,
            )
        await arm_next(ending)
        return ending


# ---- the events ---------------------------------------------------------------------------


async def announce_next(following: Followup | None, publisher: Publisher, clock: Clock) -> None:
    if following is not None and following.status is Status.SCHEDULED:
        await announce(publisher, "followup.scheduled", following, clock)


async def announce_ending(
    ending: Ending,
    publisher: Publisher,
    clock: Clock,
    *,
    reason: str,
    on_ended: Callable[[Followup], Awaitable[None]] | None = None,
    with_attempts: bool = False,
) -> Followup | None:
    """After the commit: `on_ended` (the service's log, metrics, dead letter), then the event of
    the ended occurrence (`with_attempts`: saying how many calls were tried) and that of its
    next one. The ended row, None if it had moved on."""
    ended = ending.row
    if ended is None:
        return None
    if on_ended is not None:
        await on_ended(ended)
    fields: dict[str, Any] = {"attempts": ended.attempts} if with_attempts else {}
    await announce(
        publisher,
        _EVENTS[ended.status],
        ended,
        clock,
        reason=reason,
        **fields,
        next_occurrence_id=ended.next_occurrence_id,
    )
    await announce_next(ending.following, publisher, clock)
    return ended


async def end_occurrence(
    record: Ends,
    row: Followup,
    status: Status,
    *,
    reason: str,
    plan: NextOccurrence | None,
    publisher: Publisher,
    clock: Clock,
    claim_id: UUID | None = None,
    on_ended: Callable[[Followup], Awaitable[None]] | None = None,
    with_attempts: bool = False,
) -> Followup | None:
    """End an occurrence that is not sent, continue its series and announce both."""
    ending = await record.end(row, status, reason=reason, plan=plan, claim_id=claim_id)
    return await announce_ending(
        ending,
        publisher,
        clock,
        reason=reason,
        on_ended=on_ended,
        with_attempts=with_attempts,
    )


# ---- the steps of a due timer -------------------------------------------------------------


def is_stale(row: Followup, due: TimerMessage, expected: Status) -> bool:
    """The timer's occurrence moved to another version, or is no longer `expected`."""
    return row.version != due.version or row.status is not expected


def action_item_done(row: Followup, context: SendContext) -> bool:
    """skip_if_completed, and the action item is completed."""
    return (
        row.skip_if_completed and context.action_item is not None and context.action_item.completed
    )


def contractor_zone(context: SendContext, default: ZoneInfo) -> tuple[ZoneInfo, bool]:
    """The contractor's time zone, or `default` (True when the stored one is unusable)."""
    return zone_for(context.contractor.timezone, default)


def render_template(row: Followup, context: SendContext) -> str:
    """The follow-up's template filled from its rows (TemplateError when it cannot be)."""
    return render(row.message_template, context.template_context())
