"""The operators' read-only queries against the real database."""

from __future__ import annotations

import itertools
import statistics
from datetime import UTC, datetime, timedelta

import pytest

from shared.queries import (
    Filter,
    contractor_followups,
    find_followups,
    history,
    overdue,
    pending_by_due,
    stats,
)
from shared.rows import Reference
from tests.support.data import add_contractor

NOW = datetime.now(UTC).replace(microsecond=0)
_keys = itertools.count()


async def add_followup(
    pool,
    contractor_id: int,
    due: datetime,
    *,
    status: str = "scheduled",
    followup_type: str = "check_in",
    priority: int = 0,
    tone: str = "friendly",
    prompt_variant: str | None = None,
    sent_at: datetime | None = None,
    lateness_ms: float | None = None,
    responded_after: timedelta | None = None,
    key: str | None = None,
) -> int:
    followup_id: int = await pool.fetchval(
        """INSERT INTO contractor_followup_schedules
               (contractor_id, scheduled_time, followup_type, message_template, message_tone,
                status, sent_at, response_received_at, idempotency_key, priority, prompt_variant,
                lateness_ms, text_source)
           VALUES ($1, $2, $3, 'Hi {first_name}', $4, $5, $6, $7, $8, $9, $10, $11, 'template')
           RETURNING id""",
        contractor_id,
        due,
        followup_type,
        tone,
        status,
        sent_at,
        sent_at + responded_after if sent_at and responded_after else None,
        f"key:{key or next(_keys)}",
        priority,
        prompt_variant,
        lateness_ms,
    )
    return followup_id


async def test_find_by_status_contractor_type_and_due_window(pool):
    ana, ben = await add_contractor(pool), await add_contractor(pool, first_name="Ben")
    a1 = await add_followup(pool, ana, NOW + timedelta(hours=1), followup_type="onboarding")
    a2 = await add_followup(pool, ana, NOW + timedelta(hours=3))
    b1 = await add_followup(pool, ben, NOW + timedelta(hours=2), status="cancelled")
    b2 = await add_followup(pool, ben, NOW - timedelta(days=2), status="sent", sent_at=NOW)

    def ids(rows):
        return [r.id for r in rows]

    assert ids(await find_followups(pool, Filter(contractor_id=ana))) == [a2, a1]
    assert ids(await find_followups(pool, Filter(statuses=("cancelled",)))) == [b1]
    assert ids(await find_followups(pool, Filter(followup_type="onboarding"))) == [a1]
    window = Filter(due_after=NOW, due_before=NOW + timedelta(hours=2, minutes=30))
    assert ids(await find_followups(pool, window)) == [b1, a1]
    assert ids(await find_followups(pool, Filter(limit=2, newest_first=False))) == [b2, a1]
    assert ids(await contractor_followups(pool, ben)) == [b1, b2]


async def test_pending_soonest_first_and_overdue(pool):
    sam = await add_contractor(pool)
    late = await add_followup(pool, sam, NOW - timedelta(minutes=10))
    sending = await add_followup(pool, sam, NOW - timedelta(seconds=5), status="sending")
    soon = await add_followup(pool, sam, NOW + timedelta(minutes=5), priority=7)
    await add_followup(pool, sam, NOW - timedelta(hours=1), status="sent", sent_at=NOW)

    pending = await pending_by_due(pool)
    assert [r.id for r in pending] == [late, sending, soon]
    assert pending[2].priority == 7
    assert [r.id for r in await overdue(pool, NOW)] == [late, sending]
    assert [r.id for r in await overdue(pool, NOW, grace=timedelta(minutes=1))] == [late]


async def test_history_has_the_row_transitions_and_calls_in_order(pool):
    sam = await add_contractor(pool)
    fid = await add_followup(pool, sam, NOW, key="hist-1", status="sent", sent_at=NOW)
    for stage, to in (
        ("scheduler", "scheduled"),
        ("dispatcher", "sending"),
        ("dispatcher", "sent"),
    ):
        await pool.execute(
            """INSERT INTO followup_transitions (followup_id, stage, to_status, detail)
               VALUES ($1, $2, $3, $4)""",
            fid,
            stage,
            to,
            {"note": stage},
        )
    for attempt, outcome, code in ((1, "retry", 503), (2, "sent", 200)):
        await pool.execute(
            """INSERT INTO webhook_calls (followup_id, send_key, attempt, outcome, http_status,
                                          finished_at)
               SELECT id, send_key, $2, $3, $4, clock_timestamp()
               FROM contractor_followup_schedules WHERE id = $1""",
            fid,
            attempt,
            outcome,
            code,
        )

    by_id = await history(pool, Reference(followup_id=fid))
    by_key = await history(pool, Reference(idempotency_key="hist-1"))
    assert by_id is not None
    assert by_key is not None
    assert by_key.followup.id == fid
    assert [t.to_status for t in by_id.transitions] == ["scheduled", "sending", "sent"]
    assert by_id.transitions[0].detail == {"note": "scheduler"}
    assert [(c.attempt, c.outcome, c.http_status) for c in by_id.calls] == [
        (1, "retry", 503),
        (2, "sent", 200),
    ]
    assert by_id.lateness_ms == 0.0
    assert await history(pool, Reference(followup_id=fid + 1000)) is None


async def test_stats_counts_rates_and_lateness(pool):
    sam = await add_contractor(pool)
    lateness = [float(n) for n in range(1, 101)]  # 1 .. 100 ms
    for n, late in enumerate(lateness):
        due = NOW - timedelta(hours=1, seconds=n)
        await add_followup(
            pool,
            sam,
            due,
            status="sent",
            sent_at=due + timedelta(milliseconds=late),
            # lateness_ms unset on a few rows: taken from sent_at - scheduled_time instead
            lateness_ms=None if n % 10 == 0 else late,
            followup_type="onboarding" if n < 60 else "reminder",
            prompt_variant="a" if n % 2 == 0 else "b",
            tone="friendly" if n < 50 else "firm",
            responded_after=timedelta(minutes=n + 1) if n % 4 == 0 else None,
        )
    await add_followup(pool, sam, NOW + timedelta(hours=1))
    await add_followup(pool, sam, NOW - timedelta(days=30), status="failed")

    result = await stats(pool)
    assert result.total == 102
    assert result.by_status == {"failed": 1, "scheduled": 1, "sent": 100}
    assert result.by_type["onboarding"] == {"sent": 60}
    assert result.by_type["check_in"] == {"failed": 1, "scheduled": 1}
    assert result.by_type["reminder"] == {"sent": 40}
    assert (result.sent, result.responded) == (100, 25)
    assert result.response_rate == 0.25
    expected_median = statistics.median(60.0 * (n + 1) for n in range(0, 100, 4))
    assert result.median_response_seconds == pytest.approx(expected_median)
    assert result.lateness_p50_ms == pytest.approx(50.5)
    assert result.lateness_p99_ms == pytest.approx(99.01)
    assert result.lateness_max_ms == pytest.approx(100.0)
    variants = {r.group: (r.sent, r.responded) for r in result.by_prompt_variant}
    assert variants == {"a": (50, 25), "b": (50, 0)}
    tones = {r.group: r.rate for r in result.by_tone}
    assert tones == {"firm": pytest.approx(12 / 50), "friendly": pytest.approx(13 / 50)}

    recent = await stats(pool, since=NOW - timedelta(days=1))
    assert recent.total == 101
    assert "failed" not in recent.by_status


async def test_stats_of_an_empty_record(pool):
    result = await stats(pool)
    assert result.total == 0
    assert result.response_rate is None
    assert result.lateness_p50_ms is None
    assert result.by_prompt_variant == []
