"""The dispatcher's record of a send: claim an occurrence, start its webhook call in the global
window, and settle it (sent, retried, failed, or a cancel or reschedule that came during the call).

Every claim gets an owner token (`claim_id`); each later statement of the send checks it, so a
dispatcher whose claim was taken over can change nothing. The lease of a claim is renewed while
its owner waits for a call place in its own process and starts again when the call starts, so
another dispatcher takes over only from an owner that is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal
from uuid import UUID

import asyncpg

from services.dispatcher import send_window
from services.dispatcher.ports import GiveUp, Retry, Sent, Settled, Settlement
from services.dispatcher.send_window import CallSlot
from shared.batching import Coalescer, as_columns
from shared.occurrences import (
    NextOccurrence,
    OccurrenceRecord,
    arm_next,
    continue_series,
    end_in,
    move,
)
from shared.rows import (
    CONTEXT_JOINS,
    CONTEXT_SELECT,
    Followup,
    SendContext,
    context_from,
    row_columns,
)
from shared.schemas import Status
from shared.send_rate import RatePolicy, Signal
from shared.send_rate_store import RateChange, apply_signal, lock_send_rate
from shared.transitions import record_transition

__all__ = ["DispatchRepository", "GiveUp", "Retry", "Sent", "Settled", "Settlement"]

_ROW = row_columns("f")

_CLAIM = f"""
    SELECT r.busy_id, r.claimed_from AS previous_status, r.taken_back AS resumed,
           {row_columns("(r.claimed)")}, {CONTEXT_SELECT}
    FROM followups_claim($1, $2, $3, $4, $5, $6) AS r
    {CONTEXT_JOINS.format(f="(r.claimed)")}"""

# Deliveries that come while a batch of claims is being made wait for the next one: in a burst
# the prefetched deliveries are claimed a hundred at a time, a lone one at once.
CLAIM_BATCH = 100


@dataclass(frozen=True)
class _ClaimWanted:
    followup_id: int
    version: int
    lease: timedelta
    early: timedelta
    resume: UUID | None


_Claimed = tuple[Followup, SendContext | None]


class Busy(Enum):
    """A row another transaction held when its batch was claimed."""

    ROW = "row"


_ClaimAnswer = _Claimed | None | Literal[Busy.ROW]


_MARK_SENT = f"""
    SELECT r.recorded_claim_id, {row_columns("(r.sent)")}
    FROM followups_mark_sent($1, $2, $3, $4, $5, $6, $7, $8) AS r"""

# Sends recorded while a batch of them is being written wait for the next one.
SENT_BATCH = 64


@dataclass(frozen=True)
class _SentCall:
    followup_id: int
    sent_by: str
    note: str | None
    text_fallback_reason: str | None
    http_status: int | None
    call_id: int
    claim_id: UUID | None
    lateness_ms: float

    @staticmethod
    def arguments(batch: Sequence[_SentCall]) -> list[list[Any]]:
        return as_columns(batch, *(field.name for field in fields(_SentCall)))


# $1 id, $2 claim id, $3 next attempt, $4 error, $5 count the attempt, $6 deferred reason,
# $7 still waiting for a place in the send window
_RELEASE = """
    UPDATE contractor_followup_schedules
    SET status = 'scheduled', next_attempt_at = $3,
        last_error = CASE WHEN $6::text IS NULL THEN $4 ELSE last_error END,
        lease_until = NULL, calling_since = NULL, claim_id = NULL,
        waiting_since = CASE WHEN $7 THEN waiting_since END,
        attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END,
        deferred_until = CASE WHEN $6::text IS NULL THEN deferred_until ELSE $3 END,
        deferred_reason = coalesce($6, deferred_reason),
        updated_at = now()
    WHERE id = $1 AND status = 'sending' AND claim_id = $2
    RETURNING id"""


class DispatchRepository(OccurrenceRecord):
    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, "dispatcher")
        self._claims = Coalescer(self._claim_batch, max_batch=CLAIM_BATCH)
        self._starts = Coalescer(self._start_batch, max_batch=send_window.START_BATCH)
        self._sends = Coalescer(self._record_sends, max_batch=SENT_BATCH)

    async def claim(
        self,
        followup_id: int,
        version: int,
        lease: timedelta,
        early: timedelta,
        *,
        resume: UUID | None = None,
        linger: float = 0.0,
    ) -> tuple[Followup, SendContext | None] | None:
        """Take the occurrence for sending under a new claim id, in one statement: the version
        must match, the row must be due (within `early`) and still scheduled (a committed cancel
        wins), or its owner gone (lease run out, or `resume` names its claim: the caller held it
        and stopped using it). The same round trip records the transition and reads the
        contractor, action item and event the send needs. Claims made at the same time go to
        the database together, in one statement; `linger`: seconds this one may wait for
        others to join it."""
        wanted = _ClaimWanted(followup_id, version, lease, early, resume)
        answer = await self._claims.submit(wanted, linger=linger)
        if answer is Busy.ROW:
            # Another transaction holds the row: claimed alone, waiting for it, outside the
            # batches, so that the claims of other rows do not wait with it.
            answer = (await self._claim_rows([wanted], wait=True))[0]
        assert answer is not Busy.ROW
        return answer

    async def _claim_batch(self, batch: Sequence[_ClaimWanted]) -> list[_ClaimAnswer]:
        return await self._claim_rows(batch, wait=False)

    async def _claim_rows(self, batch: Sequence[_ClaimWanted], *, wait: bool) -> list[_ClaimAnswer]:
        # The same follow-up twice in one batch (a timer and its duplicate): the first asks,
        # the others are answered as a second claim would be, "held by another".
        first = list({wanted.followup_id: wanted for wanted in reversed(batch)}.values())
        columns = as_columns(first, "followup_id", "version", "lease", "early", "resume")
        records = await self._pool.fetch(_CLAIM, *columns, wait)
        busy = {record["busy_id"] for record in records if record["busy_id"] is not None}
        claimed = {
            record["id"]: (Followup.from_record(record), context_from(record))
            for record in records
            if record["busy_id"] is None
        }
        asked: set[int] = set()
        answers: list[_ClaimAnswer] = []
        for wanted in batch:
            fresh = wanted.followup_id not in asked
            asked.add(wanted.followup_id)
            if not fresh:
                answers.append(None)
            elif wanted.followup_id in busy:
                answers.append(Busy.ROW)
            else:
                answers.append(claimed.get(wanted.followup_id))
        return answers

    async def renew(self, row: Followup, lease: timedelta) -> bool:
        """Extend the lease of a claim still waiting for its call; False if it was lost."""
        renewed = await self._pool.fetchval(
            """UPDATE contractor_followup_schedules
               SET lease_until = clock_timestamp() + $3::interval
               WHERE id = $1 AND status = 'sending' AND claim_id = $2 AND calling_since IS NULL
               RETURNING id""",
            row.id,
            row.claim_id,
            lease,
        )
        return renewed is not None

    async def start_call(
        self, row: Followup, *, limit_per_minute: int, lease: timedelta
    ) -> CallSlot:
        """A place in the global send window and the call recorded, its lease from now; or when
        this follow-up's place comes; or `lost`."""
        assert row.claim_id is not None
        return await self._starts.submit(
            send_window.CallWanted(
                row.id, row.claim_id, row.priority, row.scheduled_time, limit_per_minute, lease
            )
        )

    async def _start_batch(self, batch: Sequence[send_window.CallWanted]) -> list[CallSlot]:
        return await send_window.start_calls(self._pool, batch)

    async def pause_gateway(
        self, until: datetime, reason: str, *, policy: RatePolicy, followup_id: int
    ) -> RateChange | None:
        """Pause every replica's calls until `until`, and give the adaptive rate a throttling
        signal, in one transaction under the send window's lock; the rate's change, if any."""
        async with self._pool.acquire() as connection, connection.transaction():
            await lock_send_rate(connection)
            await connection.execute(
                """INSERT INTO gateway_pause (id, paused_until, reason) VALUES (1, $1, $2)
                   ON CONFLICT (id) DO UPDATE
                   SET paused_until = greatest(gateway_pause.paused_until,
                                               excluded.paused_until),
                       reason = excluded.reason""",
                until,
                reason,
            )
            return await apply_signal(
                connection, policy, Signal.THROTTLED, cause=reason, followup_id=followup_id
            )

    async def release_for_retry(
        self,
        row: Followup,
        *,
        next_attempt_at: datetime,
        error: str,
        count_attempt: bool = True,
        deferred_reason: str | None = None,
        waiting: bool = False,
    ) -> bool:
        """Back to `scheduled` before any call; the caller arms the timer for it next.
        `deferred_reason` marks a move that is policy, not failure (quiet hours, send window);
        `waiting` keeps its turn for a place in the send window."""
        async with self._pool.acquire() as connection, connection.transaction():
            return await _release(
                connection, row, next_attempt_at, error, count_attempt, deferred_reason, waiting
            )

    async def mark_sent(
        self,
        row: Followup,
        *,
        call_id: int,
        post_lateness: timedelta,
        http_status: int | None,
        sent_by: str,
        note: str | None,
        text_fallback_reason: str | None,
        next_occurrence: NextOccurrence | None,
        linger: float = 0.0,
    ) -> Sent:
        """Sent: the call, the row and its transition in one statement, and in the same
        transaction the next occurrence of a recurring follow-up, unless a cancel came during
        the call (it ends the series). The next occurrence is armed after the commit, so no
        broker failure can undo "sent". `post_lateness`: how late the POST left, the row's
        lateness when later than the call's recorded start. `linger`: seconds a send with
        nothing to follow it may wait for others to be recorded with it."""
        call = _SentCall(
            row.id,
            sent_by,
            note,
            text_fallback_reason,
            http_status,
            call_id,
            row.claim_id,
            post_lateness.total_seconds() * 1000,
        )
        if next_occurrence is None:
            # Nothing follows: recorded with the other sends of the moment, in one statement.
            recorded = await self._sends.submit(call, linger=linger)
            if recorded is None:
                return Sent(None, None, None)
            return Sent(recorded, None, _too_late(recorded))
        async with self._pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(_MARK_SENT, *_SentCall.arguments([call]))
            if record is None:
                return Sent(None, None, None)
            sent = Followup.from_record(record)
            too_late = _too_late(sent)
            if too_late == "cancel":
                # a cancel that came during the call ends the series
                return Sent(sent, None, too_late)
            ending = await continue_series(connection, sent, next_occurrence, stage="dispatcher")
        await arm_next(ending)
        return Sent(ending.row, ending.following, too_late)

    async def _record_sends(self, batch: Sequence[_SentCall]) -> list[Followup | None]:
        records = await self._pool.fetch(_MARK_SENT, *_SentCall.arguments(batch))
        recorded = {
            (record["id"], record["recorded_claim_id"]): Followup.from_record(record)
            for record in records
        }
        return [recorded.get((call.followup_id, call.claim_id)) for call in batch]

    async def settle_unsent(
        self,
        row: Followup,
        *,
        call_id: int | None,
        outcome: str,
        http_status: int | None,
        then: Retry | GiveUp,
    ) -> Settled:
        """After a call the gateway did not accept (or a takeover that cannot know): record the
        call's end and decide, with the row locked, so a cancel or reschedule cannot slip in
        between. A cancel kept during the call wins (cancelled, the series ends), then a kept
        reschedule (the new time under a new version); only then `then`: a retry, or the end
        as failed. The timers of a move or a retry are the caller's to arm, after the commit:
        one armed before it can fire while the row still looks claimed, and be put off."""
        async with self._pool.acquire() as connection, connection.transaction():
            if call_id is not None:
                await connection.execute(
                    """UPDATE webhook_calls SET finished_at = clock_timestamp(), outcome = $2,
                       http_status = $3 WHERE id = $1""",
                    call_id,
                    outcome,
                    http_status,
                )
            record = await connection.fetchrow(
                f"""SELECT {_ROW} FROM contractor_followup_schedules AS f
                    WHERE f.id = $1 AND f.status = 'sending' AND f.claim_id = $2
                    FOR UPDATE""",
                row.id,
                row.claim_id,
            )
            if record is None:
                return Settled(Settlement.LOST)
            current = Followup.from_record(record)
            if current.cancel_requested_at is not None:
                reason = current.cancel_reason or "cancel_requested"
                ending = await end_in(
                    connection,
                    current,
                    Status.CANCELLED,
                    stage="dispatcher",
                    reason=reason,
                    plan=None,
                    claim_id=row.claim_id,
                )
                return Settled(Settlement.CANCELLED, ending.row)
            if current.reschedule_to is not None:
                moved = await move(connection, current, current.reschedule_to, stage="dispatcher")
                return Settled(Settlement.RESCHEDULED, moved)
            if isinstance(then, Retry):
                await _release(connection, current, then.at, then.reason, True, None, False)
                return Settled(Settlement.RETRY, current)
            ending = await end_in(
                connection,
                current,
                Status.FAILED,
                stage="dispatcher",
                reason=then.reason,
                plan=then.plan,
                claim_id=row.claim_id,
            )
        await arm_next(ending)
        return Settled(Settlement.FAILED, ending.row, ending.following)


def _too_late(sent: Followup) -> str | None:
    """What came during the call the gateway accepted, recorded as too late."""
    if sent.cancel_requested_at is not None:
        return "cancel"
    if sent.reschedule_to is not None:
        return "reschedule"
    return None


async def _release(
    connection: asyncpg.Connection,
    row: Followup,
    next_attempt_at: datetime,
    error: str,
    count_attempt: bool,
    deferred_reason: str | None,
    waiting: bool,
) -> bool:
    done = await connection.fetchval(
        _RELEASE,
        row.id,
        row.claim_id,
        next_attempt_at,
        error,
        count_attempt,
        deferred_reason,
        waiting,
    )
    if done is not None:
        await record_transition(
            connection,
            row.id,
            "dispatcher",
            Status.SENDING,
            Status.SCHEDULED,
            {"retry_at": next_attempt_at.isoformat(), "reason": error},
        )
    return done is not None
