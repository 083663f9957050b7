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
    lateness_ms, deferred_until, deferred_reason
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


class FollowupStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(
        self,
        request: FollowupRequested,
        key: str,
        *,
        before_commit: Callable[[Followup], Awaitable[None]],
        scheduled_time: datetime | None = None,
        series_id: int | None = None,
    ) -> tuple[Followup, bool]:
        """Insert once per idempotency key; `before_commit` (arming timers) runs inside the
        transaction, so a failed arm leaves no row. Returns (row, created)."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""INSERT INTO contractor_followup_schedules (
                        contractor_id, action_item_id, event_id, scheduled_time, followup_type,
                        message_template, message_tone, ai_should_personalize, ai_context_hints,
                        skip_if_completed, is_recurring, recurrence_interval_days,
                        idempotency_key, priority, requested_by, series_id)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                    ON CONFLICT (idempotency_key) DO NOTHING
                    RETURNING {_COLUMNS}""",
                request.contractor_id,
                request.action_item_id,
                request.event_id,
                scheduled_time or request.scheduled_time,
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
                series_id,
            )
            if record is None:
                existing = await connection.fetchrow(
                    f"SELECT {_COLUMNS} FROM contractor_followup_schedules"
                    " WHERE idempotency_key = $1",
                    key,
                )
                return Followup.from_record(existing), False
            row = Followup.from_record(record)
            await _transition(
                connection,
                row.id,
                "scheduler",
                None,
                Status.SCHEDULED,
                {"scheduled_time": row.scheduled_time.isoformat(), "version": row.version},
            )
            await before_commit(row)
            return row, True

    async def get(self, followup_id: int) -> Followup | None:
        record = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM contractor_followup_schedules WHERE id = $1", followup_id
        )
        return Followup.from_record(record) if record else None

    async def context(self, row: Followup) -> Context | None:
        """The contractor, action item and event of a follow-up; None if the contractor is gone."""
        async with self._pool.acquire() as connection:
            contractor = await connection.fetchrow(
                "SELECT id, first_name, last_name, company_name, phone, timezone, sms_opt_out"
                " FROM contractors WHERE id = $1",
                row.contractor_id,
            )
            if contractor is None:
                return None
            action_item = event = None
            if row.action_item_id is not None:
                action_item = await connection.fetchrow(
                    "SELECT id, contractor_id, title, description, due_date, status"
                    " FROM contractor_action_items WHERE id = $1",
                    row.action_item_id,
                )
            if row.event_id is not None:
                event = await connection.fetchrow(
                    "SELECT id, name, event_date, location FROM events WHERE id = $1",
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

    async def claim(self, followup_id: int, version: int, lease: timedelta) -> Followup | None:
        """Take the occurrence for sending, in one statement: the version must match, the row
        must be due and still scheduled (a committed cancel wins), or its lease expired."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""WITH previous AS (
                        SELECT status FROM contractor_followup_schedules
                        WHERE id = $1 FOR UPDATE)
                    UPDATE contractor_followup_schedules AS f
                    SET status = 'sending', claimed_at = clock_timestamp(),
                        lease_until = clock_timestamp() + $3::interval,
                        attempts = f.attempts + 1, updated_at = now()
                    FROM previous
                    WHERE f.id = $1 AND f.version = $2
                      AND f.scheduled_time <= clock_timestamp()
                      AND ((f.status = 'scheduled' AND (f.next_attempt_at IS NULL
                                                        OR f.next_attempt_at <= clock_timestamp()))
                           OR (f.status = 'sending' AND f.lease_until < clock_timestamp()))
                    RETURNING previous.status AS previous_status, {_prefixed("f")}""",
                followup_id,
                version,
                lease,
            )
            if record is None:
                return None
            data = dict(record)
            previous = data.pop("previous_status")
            row = Followup.from_record(data)
            await _transition(
                connection,
                row.id,
                "dispatcher",
                previous,
                Status.SENDING,
                {"attempt": row.attempts, "takeover": previous == Status.SENDING},
            )
            return row

    async def start_call(self, row: Followup, *, limit_per_minute: int) -> CallSlot:
        """Take a place in the global send window (all dispatcher replicas share it) and record
        the webhook call; or say when the next place frees up."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", RATE_LIMIT_LOCK)
            frees_at = await connection.fetchval(
                """SELECT called_at + $2::interval FROM webhook_calls
                   WHERE called_at > clock_timestamp() - $2::interval
                   ORDER BY called_at DESC OFFSET $1 - 1 LIMIT 1""",
                limit_per_minute,
                RATE_WINDOW,
            )
            if frees_at is not None:
                return CallSlot(call_id=None, frees_at=frees_at)
            call_id: int = await connection.fetchval(
                """INSERT INTO webhook_calls (followup_id, send_key, attempt)
                   VALUES ($1, $2, $3) RETURNING id""",
                row.id,
                row.send_key,
                row.attempts,
            )
            await connection.execute(
                """UPDATE contractor_followup_schedules
                   SET webhook_started_at = coalesce(webhook_started_at, clock_timestamp()),
                       lateness_ms = coalesce(lateness_ms, extract(epoch FROM
                           clock_timestamp() - scheduled_time) * 1000)
                   WHERE id = $1""",
                row.id,
            )
            return CallSlot(call_id=call_id, frees_at=None)

    async def record_call_end(self, call_id: int, outcome: str, http_status: int | None) -> None:
        await self._pool.execute(
            """UPDATE webhook_calls SET finished_at = clock_timestamp(), outcome = $2,
               http_status = $3 WHERE id = $1""",
            call_id,
            outcome,
            http_status,
        )

    async def mark_sent(
        self,
        row: Followup,
        *,
        sent_by: str,
        note: str | None,
        text_fallback_reason: str | None,
    ) -> Followup | None:
        """`text_fallback_reason` set: the prepared text was not ready and the template went out."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""UPDATE contractor_followup_schedules
                    SET status = 'sent', sent_at = clock_timestamp(), sent_by = $2,
                        status_reason = $3, lease_until = NULL, last_error = NULL,
                        text_source = CASE WHEN $4::text IS NULL THEN text_source
                                           ELSE 'template' END,
                        text_fallback_reason = coalesce($4, text_fallback_reason),
                        updated_at = now()
                    WHERE id = $1 AND status = 'sending'
                    RETURNING {_COLUMNS}""",
                row.id,
                sent_by,
                note,
                text_fallback_reason,
            )
            if record is None:
                return None
            sent = Followup.from_record(record)
            await _transition(
                connection,
                row.id,
                "dispatcher",
                Status.SENDING,
                Status.SENT,
                {"sent_by": sent_by, "attempt": row.attempts, "lateness_ms": sent.lateness_ms},
            )
            return sent

    async def release_for_retry(
        self, row: Followup, *, next_attempt_at: datetime, error: str, count_attempt: bool = True
    ) -> bool:
        """Back to `scheduled` for a later attempt (the timer for it is already armed)."""
        async with self._pool.acquire() as connection, connection.transaction():
            done = await connection.fetchval(
                """UPDATE contractor_followup_schedules
                   SET status = 'scheduled', next_attempt_at = $2, last_error = $3,
                       lease_until = NULL, attempts = attempts - CASE WHEN $4 THEN 0 ELSE 1 END,
                       updated_at = now()
                   WHERE id = $1 AND status = 'sending'
                   RETURNING id""",
                row.id,
                next_attempt_at,
                error,
                count_attempt,
            )
            if done is not None:
                await _transition(
                    connection,
                    row.id,
                    "dispatcher",
                    Status.SENDING,
                    Status.SCHEDULED,
                    {"retry_at": next_attempt_at.isoformat(), "error": error},
                )
            return done is not None

    async def finish(
        self, row: Followup, status: Status, *, stage: str, reason: str
    ) -> Followup | None:
        """End a follow-up that is not sent (failed, skipped); only from a non-final status."""
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(
                f"""UPDATE contractor_followup_schedules
                    SET status = $2, status_reason = $3, lease_until = NULL, updated_at = now(),
                        last_error = CASE WHEN $2 = 'failed' THEN $3 ELSE last_error END
                    WHERE id = $1 AND status IN ('scheduled', 'sending')
                    RETURNING {_COLUMNS}""",
                row.id,
                status,
                reason,
            )
            if record is None:
                return None
            await _transition(connection, row.id, stage, row.status, status, {"reason": reason})
            return Followup.from_record(record)


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{name.strip()}" for name in _COLUMNS.split(",") if name.strip())
