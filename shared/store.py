"""All SQL of followups: the record of every follow-up and its transitions (CONTRACT §4)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from shared.schemas import FollowupRequested, Status

_COLUMNS = """
    id, contractor_id, action_item_id, event_id, scheduled_time, followup_type, message_template,
    message_tone, status, sent_at, sent_by, response_received_at, response_text,
    ai_should_personalize, ai_context_hints, skip_if_completed, is_recurring,
    recurrence_interval_days, next_occurrence_id, created_at, updated_at, idempotency_key,
    send_key, version, priority, requested_by, series_id, status_reason, prepared_text,
    prepared_version, prepared_at, text_source, text_fallback_reason, ai_model, prompt_variant,
    attempts, next_attempt_at, last_error, claimed_at, lease_until, webhook_started_at,
    lateness_ms, deferred_until, deferred_reason, calling_since, occurrence
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

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Followup:
        data = dict(record)
        data["status"] = Status(data["status"])
        return cls(**data)

    @property
    def text_is_ready(self) -> bool:
        return self.prepared_text is not None and self.prepared_version == self.version


# One minute, plus a guard for the spread between recording a call and the gateway receiving it.
RATE_WINDOW = timedelta(seconds=60, milliseconds=500)
RATE_LIMIT_LOCK = 0x666F6C6C  # advisory lock key of the global send window


@dataclass(frozen=True)
class CallSlot:
    call_id: int | None
    frees_at: datetime | None
    cancelled: bool = False


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


async def _transition(
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
_CONTEXT_COLUMNS = ", ".join(
    [f"c.{n} AS c_{n}" for n in CONTRACTOR_COLUMNS]
    + [f"a.{n} AS a_{n}" for n in ACTION_ITEM_COLUMNS]
    + [f"e.{n} AS e_{n}" for n in EVENT_COLUMNS]
)
_SELECT = f"SELECT {_COLUMNS} FROM contractor_followup_schedules"
# $1 id, $2 sent_by, $3 note, $4 text fallback reason, $5 http status, $6 webhook call id
_MARK_SENT = f"""
    WITH call AS (
        UPDATE webhook_calls SET finished_at = clock_timestamp(), outcome = 'sent',
            http_status = $5
        WHERE id = $6),
    sent AS (
        UPDATE contractor_followup_schedules
        SET status = 'sent', sent_at = clock_timestamp(), sent_by = $2, status_reason = $3,
            lease_until = NULL, last_error = NULL, calling_since = NULL,
            text_source = CASE WHEN $4::text IS NULL THEN coalesce(text_source, 'template')
                               ELSE 'template' END,
            text_fallback_reason = coalesce($4, text_fallback_reason), updated_at = now()
        WHERE id = $1 AND status = 'sending'
        RETURNING {_COLUMNS}),
    logged AS (
        INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
        SELECT id, 'dispatcher', 'sending', 'sent',
               jsonb_build_object('sent_by', sent_by, 'attempt', attempts,
                                  'lateness_ms', lateness_ms)
        FROM sent)
    SELECT * FROM sent"""


class FollowupStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ---- scheduling -------------------------------------------------------------------------

    async def insert(
        self,
        request: FollowupRequested,
        key: str,
        *,
        before_commit: Callable[[Followup], Awaitable[None]],
    ) -> tuple[Followup, bool]:
        """Insert once per idempotency key; `before_commit` (arming timers) runs inside the
        transaction, so a failed arm leaves no row. A contractor who opted out gets the row
        recorded as skipped, a key cancelled before its request arrived as cancelled; neither
        gets timers. Returns (row, created)."""
        async with self._pool.acquire() as connection, connection.transaction():
            # Serialises with a cancel of the same key, so one of the two sees the other.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
            record = await connection.fetchrow(
                f"""WITH flags AS (
                        SELECT (SELECT sms_opt_out FROM contractors WHERE id = $1) AS opted_out,
                               (SELECT coalesce(reason, 'cancel_requested') FROM cancelled_keys
                                WHERE idempotency_key = $13) AS cancelled),
                    inserted AS (
                        INSERT INTO contractor_followup_schedules (
                            contractor_id, action_item_id, event_id, scheduled_time,
                            followup_type, message_template, message_tone,
                            ai_should_personalize, ai_context_hints, skip_if_completed,
                            is_recurring, recurrence_interval_days, idempotency_key, priority,
                            requested_by, status, status_reason)
                        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               CASE WHEN cancelled IS NOT NULL THEN 'cancelled'
                                    WHEN opted_out THEN 'skipped' ELSE 'scheduled' END,
                               coalesce(cancelled, CASE WHEN opted_out THEN 'opted_out' END)
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
            row = Followup.from_record(record)
            if row.status is Status.SCHEDULED:
                await before_commit(row)
            return row, True

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
        Refused (nothing returned) for a row whose webhook call is already under way. A key with
        no row yet is remembered, so a request that arrives after its cancel is never sent."""
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
                    SET status = 'cancelled', status_reason = $3, version = f.version + 1,
                        lease_until = NULL, updated_at = now()
                    FROM target
                    WHERE (f.id = target.id OR f.series_id = target.series)
                      AND (f.status = 'scheduled'
                           OR (f.status = 'sending' AND f.calling_since IS NULL))
                    RETURNING {_prefixed("f")}""",
                reference.followup_id,
                reference.stored_key,
                reason,
            )
            rows = [Followup.from_record(r) for r in records]
            for row in rows:
                await _transition(
                    connection, row.id, "scheduler", None, Status.CANCELLED, {"reason": reason}
                )
            return rows

    async def reschedule(
        self,
        reference: Reference,
        scheduled_time: datetime,
        *,
        before_commit: Callable[[Followup], Awaitable[None]],
    ) -> Followup | None:
        """Move a pending follow-up to a new time under a new version: the old timers are
        dropped when they fire, the new ones (armed in `before_commit`) are the only live ones.
        None when there is nothing pending to move; the row unchanged when the time is the same."""
        async with self._pool.acquire() as connection, connection.transaction():
            current = await connection.fetchrow(
                f"""{_SELECT} WHERE (id = $1 OR idempotency_key = $2)
                      AND (status = 'scheduled' OR (status = 'sending' AND calling_since IS NULL))
                    FOR UPDATE""",
                reference.followup_id,
                reference.stored_key,
            )
            if current is None:
                return None
            if current["scheduled_time"] == scheduled_time:
                return Followup.from_record(current)
            record = await connection.fetchrow(
                f"""UPDATE contractor_followup_schedules
                    SET scheduled_time = $2, version = version + 1, status = 'scheduled',
                        next_attempt_at = NULL, lease_until = NULL, deferred_until = NULL,
                        deferred_reason = NULL, lateness_ms = NULL, webhook_started_at = NULL,
                        updated_at = now()
                    WHERE id = $1
                    RETURNING {_COLUMNS}""",
                current["id"],
                scheduled_time,
            )
            row = Followup.from_record(record)
            await _transition(
                connection,
                row.id,
                "scheduler",
                current["status"],
                Status.SCHEDULED,
                {
                    "rescheduled_from": current["scheduled_time"].isoformat(),
                    "scheduled_time": scheduled_time.isoformat(),
                    "version": row.version,
                },
            )
            await before_commit(row)
            return row

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
                await _transition(
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
                    f"""UPDATE contractor_followup_schedules
                        SET status = 'cancelled', status_reason = 'opted_out',
                            version = version + 1, lease_until = NULL, updated_at = now()
                        WHERE contractor_id = $1
                          AND (status = 'scheduled'
                               OR (status = 'sending' AND calling_since IS NULL))
                        RETURNING {_COLUMNS}""",
                    contractor,
                )
                cancelled = [Followup.from_record(r) for r in records]
                for row in cancelled:
                    await _transition(
                        connection,
                        row.id,
                        "scheduler",
                        None,
                        Status.CANCELLED,
                        {"reason": "opted_out"},
                    )
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
                await _transition(
                    connection,
                    followup_id,
                    "personalizer",
                    Status.SCHEDULED,
                    Status.SCHEDULED,
                    {"text_source": source, "fallback_reason": fallback_reason, "model": model},
                )
            return done is not None

    # ---- sending ----------------------------------------------------------------------------

    async def claim(
        self, followup_id: int, version: int, lease: timedelta, early: timedelta
    ) -> tuple[Followup, Context | None] | None:
        """Take the occurrence for sending, in one statement: the version must match, the row
        must be due (within `early`) and still scheduled (a committed cancel wins), or its
        lease expired. The same round trip records the transition and reads the contractor,
        action item and event the send needs."""
        record = await self._pool.fetchrow(
            f"""WITH previous AS (
                    SELECT status FROM contractor_followup_schedules WHERE id = $1),
                claimed AS (
                    UPDATE contractor_followup_schedules AS f
                    SET status = 'sending', claimed_at = clock_timestamp(),
                        lease_until = clock_timestamp() + $3::interval, calling_since = NULL,
                        attempts = f.attempts + 1, updated_at = now()
                    FROM previous
                    WHERE f.id = $1 AND f.version = $2
                      AND f.scheduled_time <= clock_timestamp() + $4::interval
                      AND ((f.status = 'scheduled' AND (f.next_attempt_at IS NULL
                                                        OR f.next_attempt_at <= clock_timestamp()))
                           OR (f.status = 'sending' AND f.lease_until < clock_timestamp()))
                    RETURNING previous.status AS previous_status, {_prefixed("f")}),
                logged AS (
                    INSERT INTO followup_transitions
                        (followup_id, stage, from_status, to_status, detail)
                    SELECT id, 'dispatcher', previous_status, 'sending',
                           jsonb_build_object('attempt', attempts,
                                              'takeover', previous_status = 'sending')
                    FROM claimed)
                SELECT claimed.*, {_CONTEXT_COLUMNS}
                FROM claimed
                LEFT JOIN contractors AS c ON c.id = claimed.contractor_id
                LEFT JOIN contractor_action_items AS a ON a.id = claimed.action_item_id
                LEFT JOIN events AS e ON e.id = claimed.event_id""",
            followup_id,
            version,
            lease,
            early,
        )
        if record is None:
            return None
        data = dict(record)
        data.pop("previous_status")
        parts: dict[str, dict[str, Any]] = {"c": {}, "a": {}, "e": {}}
        for name in [k for k in data if k[:2] in ("c_", "a_", "e_")]:
            parts[name[0]][name[2:]] = data.pop(name)
        context = None
        if parts["c"]["id"] is not None:
            context = Context(
                parts["c"],
                parts["a"] if parts["a"]["id"] is not None else None,
                parts["e"] if parts["e"]["id"] is not None else None,
            )
        return Followup.from_record(data), context

    async def start_call(self, row: Followup, *, limit_per_minute: int) -> CallSlot:
        """Take a place in the global send window (all dispatcher replicas share it), honour a
        fleet-wide pause after a 429, and record the webhook call; or say when to try again.
        `cancelled` when a cancel committed since the claim: then nothing may be sent."""
        record = await self._pool.fetchrow(
            "SELECT call_id, frees_at, cancelled FROM followups_start_call($1, $2, $3, $4, $5)",
            row.id,
            row.version,
            limit_per_minute,
            RATE_WINDOW,
            RATE_LIMIT_LOCK,
        )
        return CallSlot(
            call_id=record["call_id"], frees_at=record["frees_at"], cancelled=record["cancelled"]
        )

    async def record_call_end(self, call_id: int, outcome: str, http_status: int | None) -> None:
        await self._pool.execute(
            """UPDATE webhook_calls SET finished_at = clock_timestamp(), outcome = $2,
               http_status = $3 WHERE id = $1""",
            call_id,
            outcome,
            http_status,
        )

    async def pause_gateway(self, until: datetime, reason: str) -> None:
        await self._pool.execute(
            """INSERT INTO gateway_pause (id, paused_until, reason) VALUES (1, $1, $2)
               ON CONFLICT (id) DO UPDATE
               SET paused_until = greatest(gateway_pause.paused_until, excluded.paused_until),
                   reason = excluded.reason""",
            until,
            reason,
        )

    async def mark_sent(
        self,
        row: Followup,
        *,
        call_id: int,
        http_status: int | None,
        sent_by: str,
        note: str | None,
        text_fallback_reason: str | None,
        next_occurrence: NextOccurrence | None,
    ) -> tuple[Followup | None, Followup | None]:
        """Sent: the call, the row and its transition in one statement, and in the same
        transaction the next occurrence of a recurring follow-up. Returns (the sent row, the
        next occurrence); (None, None) if the row had left 'sending'."""
        arguments = (
            row.id,
            sent_by,
            note,
            text_fallback_reason,
            http_status,
            call_id,
        )
        if next_occurrence is None:  # one statement, no explicit transaction: one round trip
            record = await self._pool.fetchrow(_MARK_SENT, *arguments)
            return (Followup.from_record(record) if record else None), None
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(_MARK_SENT, *arguments)
            if record is None:
                return None, None
            sent = Followup.from_record(record)
            return await self._continue_series(connection, sent, next_occurrence)

    async def _continue_series(
        self, connection: asyncpg.Connection, row: Followup, plan: NextOccurrence
    ) -> tuple[Followup, Followup]:
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
            plan.scheduled_time,
        )
        if record is None:
            existing = await connection.fetchrow(
                f"{_SELECT} WHERE idempotency_key = $1", f"next:{row.id}"
            )
            return row, Followup.from_record(existing)
        following = Followup.from_record(record)
        await _transition(
            connection,
            following.id,
            "dispatcher",
            None,
            Status.SCHEDULED,
            {"previous_occurrence": row.id, "scheduled_time": plan.scheduled_time.isoformat()},
        )
        linked = await connection.fetchrow(
            f"""UPDATE contractor_followup_schedules SET next_occurrence_id = $2
                WHERE id = $1 RETURNING {_COLUMNS}""",
            row.id,
            following.id,
        )
        await plan.arm(following)
        return Followup.from_record(linked), following

    async def release_for_retry(
        self,
        row: Followup,
        *,
        next_attempt_at: datetime,
        error: str,
        count_attempt: bool = True,
        deferred_reason: str | None = None,
    ) -> bool:
        """Back to `scheduled` for a later attempt (the timer for it is already armed).
        `deferred_reason` marks a move that is policy, not failure (quiet hours, rate limit)."""
        async with self._pool.acquire() as connection, connection.transaction():
            done = await connection.fetchval(
                """UPDATE contractor_followup_schedules
                   SET status = 'scheduled', next_attempt_at = $2,
                       last_error = CASE WHEN $5::text IS NULL THEN $3 ELSE last_error END,
                       lease_until = NULL, calling_since = NULL,
                       attempts = attempts - CASE WHEN $4 THEN 0 ELSE 1 END,
                       deferred_until = CASE WHEN $5::text IS NULL THEN deferred_until ELSE $2 END,
                       deferred_reason = coalesce($5, deferred_reason),
                       updated_at = now()
                   WHERE id = $1 AND status = 'sending'
                   RETURNING id""",
                row.id,
                next_attempt_at,
                error,
                count_attempt,
                deferred_reason,
            )
            if done is not None:
                await _transition(
                    connection,
                    row.id,
                    "dispatcher",
                    Status.SENDING,
                    Status.SCHEDULED,
                    {"retry_at": next_attempt_at.isoformat(), "reason": error},
                )
            return done is not None

    async def finish(
        self,
        row: Followup,
        status: Status,
        *,
        stage: str,
        reason: str,
        next_occurrence: NextOccurrence | None = None,
    ) -> tuple[Followup | None, Followup | None]:
        """End a follow-up that is not sent (failed, skipped) from a non-final status; a
        recurring one continues with its next occurrence in the same transaction."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""UPDATE contractor_followup_schedules
                    SET status = $2, status_reason = $3, lease_until = NULL, updated_at = now(),
                        calling_since = NULL,
                        last_error = CASE WHEN $2 = 'failed' THEN $3 ELSE last_error END
                    WHERE id = $1 AND status IN {_PENDING}
                    RETURNING {_COLUMNS}""",
                row.id,
                status,
                reason,
            )
            if record is None:
                return None, None
            await _transition(connection, row.id, stage, row.status, status, {"reason": reason})
            ended = Followup.from_record(record)
            if next_occurrence is None:
                return ended, None
            return await self._continue_series(connection, ended, next_occurrence)

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


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{name.strip()}" for name in _COLUMNS.split(",") if name.strip())
