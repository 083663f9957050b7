"""What the tests need: rows (contractors, action items, events), a follow-up row without a
database, and a ready SMS request."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.dispatcher.gateway import SmsRequest
from shared.locks import SEND_WINDOW
from shared.rows import Followup
from shared.schemas import Status


async def add_contractor(
    pool: asyncpg.Pool,
    *,
    phone: str | None = "+14155552671",
    first_name: str = "Sam",
    company_name: str = "Rivera Roofing",
    timezone: str | None = None,
    sms_opt_out: bool = False,
) -> int:
    contractor_id: int = await pool.fetchval(
        """INSERT INTO contractors
               (first_name, last_name, company_name, phone, timezone, sms_opt_out)
           VALUES ($1, 'Rivera', $2, $3, $4, $5) RETURNING id""",
        first_name,
        company_name,
        phone,
        timezone,
        sms_opt_out,
    )
    return contractor_id


async def add_action_item(
    pool: asyncpg.Pool, contractor_id: int, *, title: str = "Send the W-9", status: str = "open"
) -> int:
    item_id: int = await pool.fetchval(
        """INSERT INTO contractor_action_items (contractor_id, title, description, due_date, status)
           VALUES ($1, $2, 'Needed before the first payout', current_date + 3, $3) RETURNING id""",
        contractor_id,
        title,
        status,
    )
    return item_id


async def add_event(pool: asyncpg.Pool, *, name: str = "Spring Expo") -> int:
    event_id: int = await pool.fetchval(
        """INSERT INTO events (name, event_date, location)
           VALUES ($1, now() + interval '10 days', 'Austin Convention Center') RETURNING id""",
        name,
    )
    return event_id


def sms(followup_id: int = 41) -> SmsRequest:
    return SmsRequest(
        phone="+14155552671",
        message="Hi Sam, a quick check-in from Rivera Roofing.",
        contractor_id=7,
        followup_id=followup_id,
        followup_type="check_in",
        scheduled_time=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        idempotency_key=f"6f1c2a8e-0000-4000-8000-{followup_id:012d}",
        attempt=1,
        priority=0,
    )


def followup_row(**changes: Any) -> Followup:
    """A claimed one-off occurrence (id 9, version 1, attempt 1), every other field unset unless
    `changes` sets it: for handler and decision tests that need no database."""
    values: dict[str, Any] = {field.name: None for field in dataclasses.fields(Followup)}
    values.update(
        id=9,
        version=1,
        contractor_id=1,
        status=Status.SENDING,
        ai_should_personalize=False,
        skip_if_completed=False,
        is_recurring=False,
        attempts=1,
    )
    values.update(changes)
    return Followup(**values)


async def miscounted_seconds(db: asyncpg.Pool | asyncpg.Connection) -> list[asyncpg.Record]:
    """Each second whose count in `webhook_call_seconds` differs from the calls it holds."""
    return await db.fetch(
        """SELECT epoch_second, coalesce(counted.calls, 0) AS counted,
                  coalesce(actual.calls, 0) AS actual
           FROM webhook_call_seconds AS counted
           FULL JOIN (SELECT floor(extract(epoch FROM called_at))::bigint AS epoch_second,
                             count(*) AS calls
                      FROM webhook_calls GROUP BY 1) AS actual USING (epoch_second)
           WHERE coalesce(counted.calls, 0) <> coalesce(actual.calls, 0)"""
    )


async def send_window_waiter(db: asyncpg.Pool | asyncpg.Connection) -> int | None:
    """The backend waiting for the send window's advisory lock, if one is."""
    pid: int | None = await db.fetchval(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
           AND classid = $1 AND objid = $2""",
        *SEND_WINDOW,
    )
    return pid
