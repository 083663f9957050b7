"""The record of every follow-up and its transitions: the row model and the scheduler's and
personalizer's queries (the dispatcher's are in services/dispatcher/repository.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from shared.errors import Rejected
from shared.logging import get_logger
from shared.schemas import FollowupRequested, Status

log = get_logger("followups.store")

_COLUMNS = """
    id, contractor_id, action_item_id, event_id, scheduled_time, followup_type, message_template,
    message_tone, status, sent_at, sent_by, response_received_at, response_text,
    ai_should_personalize, ai_context_hints, skip_if_completed, is_recurring,
    recurrence_interval_days, next_occurrence_id, created_at, updated_at, idempotency_key,
    send_key, version, priority, requested_by, series_id, status_reason, prepared_text,
    prepared_version, prepared_at, text_source, text_fallback_reason, ai_model, prompt_variant,
    attempts, next_attempt_at, last_error, claimed_at, lease_until, webhook_started_at,
    lateness_ms, deferred_until, deferred_reason, calling_since, occurrence, claim_id,
    cancel_requested_at, cancel_reason, reschedule_to, waiting_since, delivery_status,
    delivery_error_code, delivery_reported_at
"""


@dataclass(frozen=True)
class Followup:
    id: int
    contractor_id: int
    action_item_id: int | None
    event_id: int | None
    scheduled_time: datetime
    followup_type: str
    message_template: str
    message_tone: str
    status: Status
    sent_at: datetime | None
    sent_by: str | None
    response_received_at: datetime | None
    response_text: str | None
    ai_should_personalize: bool
    ai_context_hints: dict[str, Any]
    skip_if_completed: bool
    is_recurring: bool
    recurrence_interval_days: int | None
    next_occurrence_id: int | None
    created_at: datetime
    updated_at: datetime
    idempotency_key: str
    send_key: UUID
    version: int
    priority: int
    requested_by: str | None
    series_id: int | None
    status_reason: str | None
    prepared_text: str | None
    prepared_version: int | None
    prepared_at: datetime | None
    text_source: str | None
    text_fallback_reason: str | None
    ai_model: str | None
    prompt_variant: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    claimed_at: datetime | None
    lease_until: datetime | None
    webhook_started_at: datetime | None
    lateness_ms: float | None
    deferred_until: datetime | None
    deferred_reason: str | None
    calling_since: datetime | None
    occurrence: int
    claim_id: UUID | None  # the dispatcher claim that owns the send, while `sending`
    cancel_requested_at: datetime | None  # a cancel that came during a call, decided after it
    cancel_reason: str | None
    reschedule_to: datetime | None  # likewise a reschedule
    waiting_since: datetime | None  # waiting for a place in the global send window
    # the SMS provider's latest report on the occurrence (followup.delivery_reported)
    delivery_status: str | None = None
    delivery_error_code: str | None = None
    delivery_reported_at: datetime | None = None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Followup:
        data = dict(record)
        data["status"] = Status(data["status"])
        return cls(**data)

    @property
    def text_is_ready(self) -> bool:
        return self.prepared_text is not None and self.prepared_version == self.version


CONTRACTOR_COLUMNS = (
    "id",
    "first_name",
    "last_name",
    "company_name",
    "phone",
    "timezone",
    "sms_opt_out",
)
ACTION_ITEM_COLUMNS = ("id", "contractor_id", "title", "description", "due_date", "status")
EVENT_COLUMNS = ("id", "name", "event_date", "location")


@dataclass(frozen=True)
class Reference:
    """How a command names a follow-up: by id, or by the caller's idempotency key."""

    followup_id: int | None = None
    idempotency_key: str | None = None

    @property
    def stored_key(self) -> str | None:
        return f"key:{self.idempotency_key}" if self.idempotency_key else None


@dataclass(frozen=True)
class NextOccurrence:
    """The next occurrence of a recurring follow-up: its time and how to arm its timers."""

    scheduled_time: datetime
    arm: Callable[[Followup], Awaitable[None]]


@dataclass(frozen=True)
class ResponseOutcome:
    contractor_id: int | None
    recorded_on: Followup | None
    cancelled: list[Followup]
    opt_change: bool | None  # True: opted out, False: opted back in, None: no change


@dataclass(frozen=True)
class Context:
    """The rows a follow-up's text is built from."""

    contractor: dict[str, Any]
    action_item: dict[str, Any] | None
    event: dict[str, Any] | None


async def _log_cancels(connection: asyncpg.Connection, rows: list[Followup], reason: str) -> None:
    for row in rows:
        if row.status is Status.CANCELLED:
            await record_transition(
                connection, row.id, "scheduler", None, Status.CANCELLED, {"reason": reason}
            )
        else:
            await record_transition(
                connection,
                row.id,
                "scheduler",
                row.status,
                row.status,
                {"cancel_requested": reason, "decided_after_the_call": True},
            )


async def record_transition(
    connection: asyncpg.Connection,
    followup_id: int,
    stage: str,
    from_status: str | None,
    to_status: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    await connection.execute(
        """INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
           VALUES ($1, $2, $3, $4, $5)""",
        followup_id,
        stage,
        from_status,
        to_status,
        detail or {},
    )


_PENDING = "('scheduled', 'sending')"


def _cancel_set(reason: str) -> str:
    """SET of a cancel (`reason` the parameter holding it) of a pending row `f`: at once, unless
    its webhook call is under way; then it is kept for the dispatcher to apply after the call."""
    return f"""
    status = CASE WHEN f.calling_since IS NULL THEN 'cancelled' ELSE f.status END,
    status_reason = CASE WHEN f.calling_since IS NULL THEN {reason} ELSE f.status_reason END,
    version = f.version + CASE WHEN f.calling_since IS NULL THEN 1 ELSE 0 END,
    lease_until = CASE WHEN f.calling_since IS NULL THEN NULL ELSE f.lease_until END,
    claim_id = CASE WHEN f.calling_since IS NULL THEN NULL ELSE f.claim_id END,
    cancel_requested_at = CASE WHEN f.calling_since IS NULL THEN f.cancel_requested_at
                               ELSE coalesce(f.cancel_requested_at, now()) END,
    cancel_reason = CASE WHEN f.calling_since IS NULL THEN f.cancel_reason
                         ELSE coalesce(f.cancel_reason, {reason}) END,
    updated_at = now()"""


_SELECT = f"SELECT {_COLUMNS} FROM contractor_followup_schedules"


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
            RETURNING {_COLUMNS}""",
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


async def end(
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
            RETURNING {_COLUMNS}""",
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
    connection: asyncpg.Connection, row: Followup, scheduled_time: datetime, *, stage: str
) -> tuple[Followup, Followup, bool]:
    """Create (once) the next occurrence of a recurring row that just ended and link it.
    Returns (the ended row, linked; the next occurrence; whether it was created now). Its
    timers are for the caller to arm after the commit."""
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
            RETURNING {_COLUMNS}""",
        row.id,
        scheduled_time,
    )
    if record is None:
        existing = await connection.fetchrow(
            f"{_SELECT} WHERE idempotency_key = $1", f"next:{row.id}"
        )
        return row, Followup.from_record(existing), False
    following = Followup.from_record(record)
    await record_transition(
        connection,
        following.id,
        stage,
        None,
        Status.SCHEDULED,
        {"previous_occurrence": row.id, "scheduled_time": scheduled_time.isoformat()},
    )
    linked = await connection.fetchrow(
        f"""UPDATE contractor_followup_schedules SET next_occurrence_id = $2
            WHERE id = $1 RETURNING {_COLUMNS}""",
        row.id,
        following.id,
    )
    return Followup.from_record(linked), following, True


async def arm_after_commit(plan: NextOccurrence, following: Followup) -> None:
    """Arm a committed new occurrence. Its row is the record: if the broker refuses now, the
    failure is logged, not raised (nothing of the commit is undone), and the repair sweep arms
    the occurrence once its timer is overdue."""
    try:
        await plan.arm(following)
    except Exception as exc:
        log.warning(
            "next occurrence recorded but its timers not armed; the repair sweep will arm it",
            followup_id=following.id,
            error=exc.__class__.__name__,
        )


class FollowupStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ---- scheduling -------------------------------------------------------------------------

    async def insert(
        self,
        request: FollowupRequested,
        key: str,
    ) -> tuple[Followup, bool]:
        """Insert once per idempotency key. A contractor who opted out gets the row recorded as
        skipped, a key cancelled before its request arrived as cancelled. Returns (row,
        created). The caller arms the timers of a `scheduled` row after this commits: a timer
        due at once must find the row."""
        async with self._pool.acquire() as connection, connection.transaction():
            # The lock serialises with a cancel of the same key, so one of the two sees the
            # other. In the same round trip: whose action item the request names. Another
            # contractor's would put that contractor's item in this one's SMS and let it decide
            # skip_if_completed, so it counts as a reference that does not exist.
            item_owner = await connection.fetchval(
                """SELECT (SELECT contractor_id FROM contractor_action_items WHERE id = $2)
                   FROM pg_advisory_xact_lock(hashtext($1))""",
                key,
                request.action_item_id,
            )
            if item_owner is not None and item_owner != request.contractor_id:
                raise Rejected("unknown_reference", "action_item_id belongs to another contractor")
            record = await connection.fetchrow(
                f"""WITH flags AS (
                        SELECT (SELECT sms_opt_out FROM contractors WHERE id = $1) AS opted_out,
                               (SELECT coalesce(reason, 'cancel_requested') FROM cancelled_keys
                                WHERE idempotency_key = $13) AS cancelled,
                               -- a permanent delivery failure for the phone it still has
                               (SELECT regexp_replace(undeliverable_phone, '[^0-9]', '', 'g')
                                       = regexp_replace(phone, '[^0-9]', '', 'g')
                                FROM contractors WHERE id = $1) AS undeliverable),
                    inserted AS (
                        INSERT INTO contractor_followup_schedules (
                            contractor_id, action_item_id, event_id, scheduled_time,
                            followup_type, message_template, message_tone,
                            ai_should_personalize, ai_context_hints, skip_if_completed,
                            is_recurring, recurrence_interval_days, idempotency_key, priority,
                            requested_by, status, status_reason)
                        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               CASE WHEN cancelled IS NOT NULL THEN 'cancelled'
                                    WHEN opted_out OR undeliverable THEN 'skipped'
                                    ELSE 'scheduled' END,
                               coalesce(cancelled, CASE WHEN opted_out THEN 'opted_out'
                                                        WHEN undeliverable THEN 'undeliverable'
                                                   END)
                        FROM flags
                        ON CONFLICT (idempotency_key) DO NOTHING
                        RETURNING {_COLUMNS}),
                    logged AS (
                        INSERT INTO followup_transitions
                            (followup_id, stage, from_status, to_status, detail)
                        SELECT id, 'scheduler', NULL, status,
                               jsonb_build_object('scheduled_time', scheduled_time,
                                                  'reason', status_reason)
                        FROM inserted)
                    SELECT * FROM inserted""",
                request.contractor_id,
                request.action_item_id,
                request.event_id,
                request.scheduled_time,
                request.followup_type,
                request.message_template,
                request.message_tone,
                request.ai_should_personalize,
                request.ai_context_hints,
                request.skip_if_completed,
                request.is_recurring,
                request.recurrence_interval_days,
                key,
                request.priority,
                request.requested_by,
            )
            if record is None:
                existing = await connection.fetchrow(f"{_SELECT} WHERE idempotency_key = $1", key)
                return Followup.from_record(existing), False
            if record["is_recurring"]:
                record = await connection.fetchrow(
                    f"""UPDATE contractor_followup_schedules SET series_id = id WHERE id = $1
                        RETURNING {_COLUMNS}""",
                    record["id"],
                )
            return Followup.from_record(record), True

    async def get(self, followup_id: int) -> Followup | None:
        record = await self._pool.fetchrow(f"{_SELECT} WHERE id = $1", followup_id)
        return Followup.from_record(record) if record else None

    async def find(self, reference: Reference) -> Followup | None:
        record = await self._pool.fetchrow(
            f"{_SELECT} WHERE id = $1 OR idempotency_key = $2",
            reference.followup_id,
            reference.stored_key,
        )
        return Followup.from_record(record) if record else None

    async def cancel(self, reference: Reference, reason: str) -> list[Followup]:
        """Cancel the follow-up, and the pending occurrence of its series when it is recurring.
        A row whose webhook call is under way keeps the cancel (`cancel_requested_at`) and is
        returned still `sending`: the dispatcher decides when the call ends (cancelled unless
        the gateway accepted it). A key with no row yet is remembered, so a request that arrives
        after its cancel is never sent."""
        async with self._pool.acquire() as connection, connection.transaction():
            key = reference.stored_key
            if key is not None:
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
                known = await connection.fetchval(
                    "SELECT 1 FROM contractor_followup_schedules WHERE idempotency_key = $1", key
                )
                if known is None:
                    await connection.execute(
                        """INSERT INTO cancelled_keys (idempotency_key, reason) VALUES ($1, $2)
                           ON CONFLICT (idempotency_key) DO NOTHING""",
                        key,
                        reason,
                    )
                    return []
            records = await connection.fetch(
                f"""WITH target AS (
                        SELECT id, coalesce(series_id, id) AS series
                        FROM contractor_followup_schedules
                        WHERE id = $1 OR idempotency_key = $2)
                    UPDATE contractor_followup_schedules AS f
                    SET {_cancel_set("$3")}
                    FROM target
                    WHERE (f.id = target.id OR f.series_id = target.series)
                      AND f.status IN {_PENDING}
                    RETURNING {row_columns("f")}""",
                reference.followup_id,
                reference.stored_key,
                reason,
            )
            rows = [Followup.from_record(r) for r in records]
            await _log_cancels(connection, rows, reason)
            return rows

    async def reschedule(
        self,
        reference: Reference,
        scheduled_time: datetime,
    ) -> Followup | None:
        """Move a pending follow-up to a new time under a new version: the old timers are
        dropped when they fire, the new ones (armed by the caller after this commits) are the
        only live ones.
        None when there is nothing pending to move; the row unchanged when the time is the same.
        A row whose webhook call is under way keeps the new time (`reschedule_to`) and is
        returned still `sending`: the dispatcher moves it when the call ends, unless the gateway
        accepted the call."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""{_SELECT} WHERE (id = $1 OR idempotency_key = $2) AND status IN {_PENDING}
                    FOR UPDATE""",
                reference.followup_id,
                reference.stored_key,
            )
            if record is None:
                return None
            current = Followup.from_record(record)
            if current.calling_since is not None:
                kept = await connection.fetchrow(
                    f"""UPDATE contractor_followup_schedules SET reschedule_to = $2,
                            updated_at = now()
                        WHERE id = $1 RETURNING {_COLUMNS}""",
                    current.id,
                    scheduled_time,
                )
                await record_transition(
                    connection,
                    current.id,
                    "scheduler",
                    current.status,
                    current.status,
                    {
                        "reschedule_requested": scheduled_time.isoformat(),
                        "decided_after_the_call": True,
                    },
                )
                return Followup.from_record(kept)
            if current.scheduled_time == scheduled_time:
                return current
            return await move(connection, current, scheduled_time, stage="scheduler")

    # ---- responses and opt-out --------------------------------------------------------------

    async def record_response(
        self,
        *,
        contractor_id: int | None,
        phone_digits: tuple[str, str] | None,
        followup_id: int | None,
        text: str,
        received_at: datetime,
        opt_out: bool | None,
    ) -> ResponseOutcome:
        """Store a reply on the contractor's most recent sent follow-up (or the named one); an
        opt-out word also opts the contractor out and cancels everything pending, atomically."""
        async with self._pool.acquire() as connection, connection.transaction():
            international, national = phone_digits or (None, None)
            contractor = await connection.fetchval(
                """SELECT id FROM contractors
                   WHERE id = $1 OR regexp_replace(phone, '[^0-9]', '', 'g') IN ($2, $3)
                   ORDER BY id LIMIT 1""",
                contractor_id,
                international,
                national,
            )
            if contractor is None:
                return ResponseOutcome(None, None, [], None)
            record = await connection.fetchrow(
                f"""UPDATE contractor_followup_schedules
                    SET response_received_at = $3, response_text = $4, updated_at = now()
                    WHERE id = (
                        SELECT id FROM contractor_followup_schedules
                        WHERE contractor_id = $1 AND status = 'sent'
                          AND ($2::bigint IS NULL OR id = $2)
                        ORDER BY sent_at DESC LIMIT 1)
                    RETURNING {_COLUMNS}""",
                contractor,
                followup_id,
                received_at,
                text,
            )
            recorded = Followup.from_record(record) if record else None
            if recorded is not None:
                await record_transition(
                    connection,
                    recorded.id,
                    "scheduler",
                    Status.SENT,
                    Status.SENT,
                    {"response_received_at": received_at.isoformat()},
                )
            cancelled: list[Followup] = []
            if opt_out is not None:
                await connection.execute(
                    "UPDATE contractors SET sms_opt_out = $2, updated_at = now() WHERE id = $1",
                    contractor,
                    opt_out,
                )
            if opt_out:
                records = await connection.fetch(
                    f"""UPDATE contractor_followup_schedules AS f
                        SET {_cancel_set("'opted_out'")}
                        WHERE f.contractor_id = $1 AND f.status IN {_PENDING}
                        RETURNING {row_columns("f")}""",
                    contractor,
                )
                touched = [Followup.from_record(r) for r in records]
                await _log_cancels(connection, touched, "opted_out")
                cancelled = [row for row in touched if row.status is Status.CANCELLED]
            return ResponseOutcome(contractor, recorded, cancelled, opt_out)

    # ---- preparing the text -----------------------------------------------------------------

    async def context(self, row: Followup) -> Context | None:
        """The contractor, action item and event of a follow-up; None if the contractor is gone."""
        async with self._pool.acquire() as connection:
            contractor = await connection.fetchrow(
                f"SELECT {', '.join(CONTRACTOR_COLUMNS)} FROM contractors WHERE id = $1",
                row.contractor_id,
            )
            if contractor is None:
                return None
            action_item = event = None
            if row.action_item_id is not None:
                action_item = await connection.fetchrow(
                    f"SELECT {', '.join(ACTION_ITEM_COLUMNS)}"
                    " FROM contractor_action_items WHERE id = $1",
                    row.action_item_id,
                )
            if row.event_id is not None:
                event = await connection.fetchrow(
                    f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE id = $1",
                    row.event_id,
                )
        return Context(
            dict(contractor),
            dict(action_item) if action_item else None,
            dict(event) if event else None,
        )

    async def store_text(
        self,
        followup_id: int,
        version: int,
        *,
        text: str,
        source: str,
        fallback_reason: str | None,
        model: str | None,
        variant: str | None,
    ) -> bool:
        """Keep the prepared text for this version; False if the row moved on meanwhile."""
        async with self._pool.acquire() as connection, connection.transaction():
            done = await connection.fetchval(
                """UPDATE contractor_followup_schedules
                   SET prepared_text = $3, prepared_version = version, prepared_at = now(),
                       text_source = $4, text_fallback_reason = $5, ai_model = $6,
                       prompt_variant = $7, updated_at = now()
                   WHERE id = $1 AND version = $2 AND status = 'scheduled'
                   RETURNING id""",
                followup_id,
                version,
                text,
                source,
                fallback_reason,
                model,
                variant,
            )
            if done is not None:
                await record_transition(
                    connection,
                    followup_id,
                    "personalizer",
                    Status.SCHEDULED,
                    Status.SCHEDULED,
                    {"text_source": source, "fallback_reason": fallback_reason, "model": model},
                )
            return done is not None

    # ---- ending -----------------------------------------------------------------------------

    async def finish(
        self,
        row: Followup,
        status: Status,
        *,
        stage: str,
        reason: str,
        next_occurrence: NextOccurrence | None = None,
        claim_id: UUID | None = None,
    ) -> tuple[Followup | None, Followup | None]:
        """End a follow-up that is not sent (failed, skipped): a `scheduled` one, or with
        `claim_id` a `sending` one that this claim still owns. A recurring one continues with its
        next occurrence, created in the same transaction and armed after the commit.
        (None, None) when the row had moved on."""
        async with self._pool.acquire() as connection, connection.transaction():
            ended = await end(
                connection, row, status, stage=stage, reason=reason, claim_id=claim_id
            )
            if ended is None or next_occurrence is None:
                return ended, None
            ended, following, created = await continue_series(
                connection, ended, next_occurrence.scheduled_time, stage=stage
            )
        if created:
            await arm_after_commit(next_occurrence, following)
        return ended, following

    # ---- repair -----------------------------------------------------------------------------

    async def overdue(self, grace: timedelta, limit: int = 500) -> list[Followup]:
        """Rows whose send timer should have fired more than `grace` ago: scheduled ones past
        their (next attempt) time, and sending ones whose lease ran out."""
        records = await self._pool.fetch(
            # A range on scheduled_time over the pending index (now(), not the volatile
            # clock_timestamp(), so the index can bound it): a sending row's lease ends well
            # after its scheduled_time, so both kinds lie below the bound.
            f"""{_SELECT}
                WHERE status IN ('scheduled', 'sending')
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
            f"""{_SELECT}
                WHERE status IN ('scheduled', 'sending') AND status = 'scheduled'
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


def row_columns(alias: str) -> str:
    """Every column of a row as `alias.name`, the order `Followup` is built from."""
    return ", ".join(f"{alias}.{name.strip()}" for name in _COLUMNS.split(",") if name.strip())
