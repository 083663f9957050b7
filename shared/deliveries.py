"""Delivery reports on the record: the provider's latest word on each occurrence, permanent
failures that stop sends to a phone, and the signal each report gives the adaptive send rate."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

import asyncpg

from shared.rows import Followup, cancellable, row_columns
from shared.schemas import DeliveryReported, DeliveryStatus, Status
from shared.send_rate import RatePolicy, Signal, signal_for_report
from shared.send_rate_store import RateChange, apply_signal, lock_send_rate
from shared.transitions import record_transition

_ROW = row_columns("f")

_SELECT_BY_SEND_KEY = f"""
    SELECT {_ROW} FROM contractor_followup_schedules AS f WHERE f.send_key = $1 FOR UPDATE"""

_RECORD = f"""
    UPDATE contractor_followup_schedules AS f
    SET delivery_status = $2, delivery_error_code = $3, delivery_reported_at = $4,
        updated_at = now()
    WHERE f.id = $1
    RETURNING {_ROW}"""

# Pending follow-ups of a contractor whose phone can't take an SMS: skipped at once, unless a
# webhook call is under way (that one is already at the gateway). A recurring one is left to the
# dispatcher, which skips each occurrence at its time and plans the next, so the series goes on
# once the phone changes.
_SKIP_PENDING = f"""
    WITH target AS (
        SELECT p.id, p.status AS previous_status FROM contractor_followup_schedules AS p
        WHERE p.contractor_id = $1 AND {cancellable("p")} AND NOT p.is_recurring
        FOR UPDATE)
    UPDATE contractor_followup_schedules AS f
    SET status = 'skipped', status_reason = 'undeliverable', version = f.version + 1,
        lease_until = NULL, claim_id = NULL, waiting_since = NULL, updated_at = now()
    FROM target
    WHERE f.id = target.id
    RETURNING target.previous_status, {_ROW}"""

_MARK_UNDELIVERABLE = """
    UPDATE contractors
    SET undeliverable_phone = phone, undeliverable_code = $2, undeliverable_at = $3,
        updated_at = now()
    WHERE id = $1 AND phone IS NOT NULL
      AND (undeliverable_at IS NULL OR undeliverable_at <= $3)
    RETURNING id"""

# A later delivery to the same phone shows it works again.
_CLEAR_UNDELIVERABLE = """
    UPDATE contractors
    SET undeliverable_phone = NULL, undeliverable_code = NULL, undeliverable_at = NULL,
        updated_at = now()
    WHERE id = $1 AND undeliverable_phone IS NOT NULL AND undeliverable_at < $2
    RETURNING id"""


class ReportOutcome(StrEnum):
    RECORDED = "recorded"
    # recorded on an occurrence that is not `sent` (yet: the report can overtake the commit)
    NOT_SENT = "not_sent"
    STALE = "stale"  # a report at least as recent was already recorded
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class CarrierCodes:
    throttle: frozenset[str]
    undeliverable: frozenset[str]


@dataclass(frozen=True)
class DeliveryRecord:
    row: Followup | None  # None: no occurrence has this send key
    outcome: ReportOutcome | None = None
    rate_change: RateChange | None = None
    skipped: tuple[Followup, ...] = ()
    undeliverable: bool = False  # the contractor's phone was marked undeliverable now


def send_key(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


class DeliveryStore:
    def __init__(self, pool: asyncpg.Pool, policy: RatePolicy, codes: CarrierCodes) -> None:
        self._pool = pool
        self.policy = policy
        self.codes = codes

    async def record(self, report: DeliveryReported) -> DeliveryRecord:
        """Store the report on its occurrence, with a transition, if it is later than the one
        stored; apply a permanent failure to the contractor; and, last (it takes the send
        window's lock until the commit), give the adaptive rate its signal. A stale or repeated
        report changes nothing, so a redelivery never counts twice."""
        key = send_key(report.idempotency_key)
        if key is None:
            return DeliveryRecord(None)
        async with self._pool.acquire() as connection, connection.transaction():
            # The send window's lock first, the order `followups_start_call` takes its locks
            # in (then the row): skipping a claimed row below can't deadlock with its call.
            await lock_send_rate(connection)
            record = await connection.fetchrow(_SELECT_BY_SEND_KEY, key)
            if record is None:
                return DeliveryRecord(None)
            current = Followup.from_record(record)
            detail = {
                "delivery_status": report.status.value,
                "error_code": report.error_code,
                "provider": report.provider,
                "reported_at": report.reported_at.isoformat(),
            }
            stored_at = current.delivery_reported_at
            if stored_at is not None and report.reported_at <= stored_at:
                repeated = (
                    report.reported_at == stored_at
                    and report.status.value == current.delivery_status
                    and report.error_code == current.delivery_error_code
                )
                if repeated:
                    return DeliveryRecord(current, ReportOutcome.DUPLICATE)
                await record_transition(
                    connection,
                    current.id,
                    "gateway",
                    current.status,
                    current.status,
                    {**detail, "superseded_by": stored_at.isoformat()},
                )
                return DeliveryRecord(current, ReportOutcome.STALE)
            row = Followup.from_record(
                await connection.fetchrow(
                    _RECORD, current.id, report.status.value, report.error_code, report.reported_at
                )
            )
            await record_transition(
                connection,
                row.id,
                "gateway",
                row.status,
                row.status,
                {k: v for k, v in detail.items() if v is not None},
            )
            skipped: list[Followup] = []
            marked = False
            if report.status is DeliveryStatus.DELIVERED:
                await connection.execute(
                    _CLEAR_UNDELIVERABLE, row.contractor_id, report.reported_at
                )
            elif report.error_code in self.codes.undeliverable:
                marked = (
                    await connection.fetchval(
                        _MARK_UNDELIVERABLE,
                        row.contractor_id,
                        report.error_code,
                        report.reported_at,
                    )
                    is not None
                )
                if marked:
                    skipped = await _skip_pending(connection, row.contractor_id, report.error_code)
            signal = signal_for_report(report.status.value, report.error_code, self.codes.throttle)
            change = await apply_signal(
                connection,
                self.policy,
                signal,
                cause=f"error_code {report.error_code}"
                if signal is Signal.THROTTLED
                else "recovery",
                followup_id=row.id,
            )
        outcome = ReportOutcome.RECORDED if row.status is Status.SENT else ReportOutcome.NOT_SENT
        return DeliveryRecord(row, outcome, change, tuple(skipped), marked)


async def _skip_pending(
    connection: asyncpg.Connection, contractor_id: int, error_code: str | None
) -> list[Followup]:
    skipped = []
    for record in await connection.fetch(_SKIP_PENDING, contractor_id):
        data = dict(record)
        previous = data.pop("previous_status")
        row = Followup.from_record(data)
        await record_transition(
            connection,
            row.id,
            "scheduler",
            previous,
            Status.SKIPPED,
            {"reason": "undeliverable", "error_code": error_code},
        )
        skipped.append(row)
    return skipped
