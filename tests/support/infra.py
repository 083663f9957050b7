"""Emptying a test database between tests."""

from __future__ import annotations

import asyncpg

TABLES = (
    "webhook_calls",
    "followup_transitions",
    "contractor_followup_schedules",
    "events",
    "contractor_action_items",
    "contractors",
    "send_rate",
    "send_rate_changes",
)


async def truncate(pool: asyncpg.Pool) -> None:
    # Sequences keep counting, so a timer left over from an earlier test never matches a new row.
    await pool.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
