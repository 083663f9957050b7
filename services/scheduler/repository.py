"""The scheduler's record: a request stored once per idempotency key, cancels and reschedules
(kept for the dispatcher to decide when a webhook call is under way), replies and opt-outs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg

from services.scheduler.intake import Stored, insert_request, insert_requests
from shared.batching import Coalescer
from shared.errors import Rejected
from shared.occurrences import move
from shared.rows import (
    COLUMNS,
    SELECT,
    Followup,
    Reference,
    cancellable,
    find_followup,
    get_followup,
    pending,
    row_columns,
)
from shared.schemas import FollowupRequested, Status
from shared.transitions import record_transition


@dataclass(frozen=True)
class ResponseOutcome:
    contractor_id: int | None
    recorded_on: Followup | None
    cancelled: list[Followup]
    opt_change: bool | None  # True: opted out, False: opted back in, None: no change


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


def _cancel_set(reason: str) -> str:
    """SET of a cancel (`reason` the parameter holding it) of a pending row `f`: at once, unless
    its webhook call is under way; then it is kept for the dispatcher to apply after the call."""
    at_once = cancellable("f")
    return f"""
    status = CASE WHEN {at_once} THEN 'cancelled' ELSE f.status END,
    status_reason = CASE WHEN {at_once} THEN {reason} ELSE f.status_reason END,
    version = f.version + CASE WHEN {at_once} THEN 1 ELSE 0 END,
    lease_until = CASE WHEN {at_once} THEN NULL ELSE f.lease_until END,
    claim_id = CASE WHEN {at_once} THEN NULL ELSE f.claim_id END,
    cancel_requested_at = CASE WHEN {at_once} THEN f.cancel_requested_at
                               ELSE coalesce(f.cancel_requested_at, now()) END,
    cancel_reason = CASE WHEN {at_once} THEN f.cancel_reason
                         ELSE coalesce(f.cancel_reason, {reason}) END,
    updated_at = now()"""


class SchedulerStore(Protocol):
    """What the scheduler's handlers need of the record."""

    async def insert(
        self, request: FollowupRequested, key: str, *, linger: float = 0.0
    ) -> tuple[Followup, bool]: ...

    async def find(self, reference: Reference) -> Followup | None: ...

    async def cancel(self, reference: Reference, reason: str) -> list[Followup]: ...

    async def reschedule(
        self, reference: Reference, scheduled_time: datetime
    ) -> Followup | None: ...

    async def record_response(
        self,
        *,
        contractor_id: int | None,
        phone_digits: tuple[str, str] | None,
        followup_id: int | None,
        text: str,
        received_at: datetime,
        opt_out: bool | None,
    ) -> ResponseOutcome: ...


# Requests that arrive while a batch of them is being stored wait for the next one.
INSERT_BATCH = 64


class SchedulerRepository:
    """`in_flight`: how many requests the service handles at once (its prefetch). A batch that
    holds them all is full: no other request can come to join it until one is answered."""

    def __init__(self, pool: asyncpg.Pool, *, in_flight: int = INSERT_BATCH) -> None:
        self._pool = pool
        self._requests = Coalescer(self._insert_batch, max_batch=min(INSERT_BATCH, in_flight))

    async def insert(
        self, request: FollowupRequested, key: str, *, linger: float = 0.0
    ) -> tuple[Followup, bool]:
        """Insert once per idempotency key. A contractor who opted out gets the row recorded as
        skipped, a key cancelled before its request arrived as cancelled. Returns (row,
        created). The caller arms the timers of a `scheduled` row after this commits: a timer
        due at once must find the row. Requests that arrive together are stored together, in
        one round trip; `linger`: seconds this one may wait for others to join it."""
        stored, row = await self._requests.submit((request, key), linger=linger)
        if stored is Stored.FAILED:
            # It failed in its batch: alone, it fails as it would have (or, if what failed it
            # has gone, it is stored).
            stored, row = await insert_request(self._pool, request, key)
        if row is None:
            raise Rejected("unknown_reference", "action_item_id belongs to another contractor")
        return row, stored is Stored.CREATED

    async def _insert_batch(
        self, batch: Sequence[tuple[FollowupRequested, str]]
    ) -> list[tuple[Stored, Followup | None]]:
        return await insert_requests(self._pool, batch)

    async def get(self, followup_id: int) -> Followup | None:
        return await get_followup(self._pool, followup_id)

    async def find(self, reference: Reference) -> Followup | None:
        return await find_followup(self._pool, reference)

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
                      AND {pending("f")}
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
                f"""{SELECT} AS f
                    WHERE (id = $1 OR idempotency_key = $2) AND {pending("f")}
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
                        WHERE id = $1 RETURNING {COLUMNS}""",
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
                    RETURNING {COLUMNS}""",
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
                        WHERE f.contractor_id = $1 AND {pending("f")}
                        RETURNING {row_columns("f")}""",
                    contractor,
                )
                touched = [Followup.from_record(r) for r in records]
                await _log_cancels(connection, touched, "opted_out")
                cancelled = [row for row in touched if row.status is Status.CANCELLED]
            return ResponseOutcome(contractor, recorded, cancelled, opt_out)
