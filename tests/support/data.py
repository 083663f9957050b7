"""Rows the tests need: contractors, action items, events."""

from __future__ import annotations

import asyncpg


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
