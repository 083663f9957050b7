"""Read-only questions operators ask of the record: what is due, what happened, how it went."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shared.rows import PENDING_STATUSES, Followup, Reference, find_followup

PENDING = tuple(status.value for status in PENDING_STATUSES)


@dataclass(frozen=True)
class Summary:
    """One follow-up as a line of `followups list`."""

    id: int
    contractor_id: int
    followup_type: str
    status: str
    priority: int
    scheduled_time: datetime
    sent_at: datetime | None
    lateness_ms: float | None
    attempts: int
    text_source: str | None
    status_reason: str | None = None
    # Why a pending follow-up waits: a policy move (quiet hours), a place in the send window, a
    # retry after a failed call.
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    deferred_until: datetime | None = None
    deferred_reason: str | None = None
    waiting_since: datetime | None = None
    delivery_status: str | None = None  # the SMS provider's latest report


@dataclass(frozen=True)
class Filter:
    statuses: tuple[str, ...] = ()
    contractor_id: int | None = None
    followup_type: str | None = None
    due_after: datetime | None = None
    due_before: datetime | None = None
    limit: int = 50
    newest_first: bool = True


_SUMMARY = """
    SELECT id, contractor_id, followup_type, status, priority, scheduled_time, sent_at,
           lateness_ms, attempts, text_source, status_reason, next_attempt_at, last_error,
           deferred_until, deferred_reason, waiting_since, delivery_status
    FROM contractor_followup_schedules
    WHERE (cardinality($1::text[]) = 0 OR status = ANY($1::text[]))
      AND ($2::bigint IS NULL OR contractor_id = $2)
      AND ($3::text IS NULL OR followup_type = $3)
      AND ($4::timestamptz IS NULL OR scheduled_time >= $4)
      AND ($5::timestamptz IS NULL OR scheduled_time < $5)
"""


async def find_followups(pool: asyncpg.Pool, where: Filter) -> list[Summary]:
    """Follow-ups matching `where`, by due time (newest first unless asked otherwise)."""
    order = "DESC" if where.newest_first else "ASC"
    records = await pool.fetch(
        f"{_SUMMARY} ORDER BY scheduled_time {order}, id {order} LIMIT $6",
        list(where.statuses),
        where.contractor_id,
        where.followup_type,
        where.due_after,
        where.due_before,
        where.limit,
    )
    return [Summary(**dict(r)) for r in records]


async def pending_by_due(
    pool: asyncpg.Pool, *, due_before: datetime | None = None, limit: int = 50
) -> list[Summary]:
    """Not yet final, soonest first."""
    return await find_followups(
        pool, Filter(statuses=PENDING, due_before=due_before, limit=limit, newest_first=False)
    )


async def overdue(
    pool: asyncpg.Pool, now: datetime, grace: timedelta = timedelta(0), limit: int = 50
) -> list[Summary]:
    """Not yet final although their time passed more than `grace` ago, oldest first."""
    return await pending_by_due(pool, due_before=now - grace, limit=limit)


async def contractor_followups(
    pool: asyncpg.Pool, contractor_id: int, limit: int = 50
) -> list[Summary]:
    return await find_followups(pool, Filter(contractor_id=contractor_id, limit=limit))


@dataclass(frozen=True)
class Transition:
    at: datetime
    stage: str
    from_status: str | None
    to_status: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class WebhookCall:
    attempt: int
    called_at: datetime
    finished_at: datetime | None
    outcome: str | None
    http_status: int | None


@dataclass(frozen=True)
class History:
    followup: Followup
    transitions: list[Transition]
    calls: list[WebhookCall]

    @property
    def lateness_ms(self) -> float | None:
        """Recorded at the webhook call; else the sent time minus the due time."""
        row = self.followup
        if row.lateness_ms is not None:
            return row.lateness_ms
        if row.sent_at is None:
            return None
        return (row.sent_at - row.scheduled_time).total_seconds() * 1000


async def history(pool: asyncpg.Pool, reference: Reference) -> History | None:
    """One follow-up with every transition and every webhook call, in order."""
    row = await find_followup(pool, reference)
    if row is None:
        return None
    transitions = await pool.fetch(
        """SELECT at, stage, from_status, to_status, detail FROM followup_transitions
           WHERE followup_id = $1 ORDER BY at, id""",
        row.id,
    )
    calls = await pool.fetch(
        """SELECT attempt, called_at, finished_at, outcome, http_status FROM webhook_calls
           WHERE followup_id = $1 ORDER BY called_at, id""",
        row.id,
    )
    return History(
        followup=row,
        transitions=[Transition(**dict(t)) for t in transitions],
        calls=[WebhookCall(**dict(c)) for c in calls],
    )


@dataclass(frozen=True)
class ResponseRate:
    """Responses to sent follow-ups within one group (a prompt variant, a tone)."""

    group: str
    sent: int
    responded: int

    @property
    def rate(self) -> float | None:
        return self.responded / self.sent if self.sent else None


@dataclass(frozen=True)
class Stats:
    since: datetime | None
    total: int
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    sent: int
    responded: int
    median_response_seconds: float | None
    lateness_p50_ms: float | None
    lateness_p99_ms: float | None
    lateness_max_ms: float | None
    by_prompt_variant: list[ResponseRate] = field(default_factory=list)
    by_tone: list[ResponseRate] = field(default_factory=list)

    @property
    def response_rate(self) -> float | None:
        return self.responded / self.sent if self.sent else None


_LATENESS = """coalesce(lateness_ms,
                        extract(epoch FROM sent_at - scheduled_time)::double precision * 1000)"""
_IN_WINDOW = "($1::timestamptz IS NULL OR scheduled_time >= $1)"


async def _rates(pool: asyncpg.Pool, since: datetime | None, group: str) -> list[ResponseRate]:
    records = await pool.fetch(
        f"""SELECT coalesce({group}, '(none)') AS grp, count(*) AS sent,
                   count(response_received_at) AS responded
            FROM contractor_followup_schedules
            WHERE status = 'sent' AND {_IN_WINDOW}
            GROUP BY grp ORDER BY grp""",
        since,
    )
    return [ResponseRate(r["grp"], r["sent"], r["responded"]) for r in records]


async def stats(pool: asyncpg.Pool, since: datetime | None = None) -> Stats:
    """Counts, response rates and send lateness of follow-ups due since `since` (all if None)."""
    counts = await pool.fetch(
        f"""SELECT followup_type, status, count(*) AS n FROM contractor_followup_schedules
            WHERE {_IN_WINDOW} GROUP BY followup_type, status""",
        since,
    )
    by_status: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    for r in counts:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        by_type.setdefault(r["followup_type"], {})[r["status"]] = r["n"]
    sent = await pool.fetchrow(
        f"""SELECT count(*) AS sent,
                   count(response_received_at) AS responded,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                       response_received_at - sent_at)::double precision)
                       FILTER (WHERE response_received_at IS NOT NULL) AS median_response,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY {_LATENESS}) AS p50,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY {_LATENESS}) AS p99,
                   max({_LATENESS}) AS max
            FROM contractor_followup_schedules
            WHERE status = 'sent' AND sent_at IS NOT NULL AND {_IN_WINDOW}""",
        since,
    )
    assert sent is not None
    return Stats(
        since=since,
        total=sum(by_status.values()),
        by_status=dict(sorted(by_status.items())),
        by_type={k: dict(sorted(v.items())) for k, v in sorted(by_type.items())},
        sent=sent["sent"],
        responded=sent["responded"],
        median_response_seconds=_float(sent["median_response"]),
        lateness_p50_ms=_float(sent["p50"]),
        lateness_p99_ms=_float(sent["p99"]),
        lateness_max_ms=_float(sent["max"]),
        by_prompt_variant=await _rates(pool, since, "prompt_variant"),
        by_tone=await _rates(pool, since, "message_tone"),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
