"""The adaptive send rate in PostgreSQL (`send_rate`, one row, and `send_rate_changes`).

A signal is applied inside the caller's transaction under the send window's advisory lock
(`shared.locks.SEND_WINDOW`), the lock `followups_start_call` counts the window under: the state
is read, the rule of `shared.send_rate` applied and the result written before any other replica
can read or change it, and every call place taken after the commit is counted at the new rate.
The lock holds up every send until the commit: keep such a transaction short.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.locks import SEND_WINDOW
from shared.send_rate import RatePolicy, RateState, Signal, next_state


@dataclass(frozen=True)
class RateChange:
    at: datetime
    limit_per_minute: int
    previous_limit: int
    cause: str
    followup_id: int | None


async def lock_send_rate(connection: asyncpg.Connection) -> datetime:
    """The send window's lock, until the transaction ends (taking it again is a no-op); the
    database's time once it is held."""
    now: datetime = await connection.fetchval(
        "SELECT clock_timestamp() FROM pg_advisory_xact_lock($1, $2)",
        SEND_WINDOW.namespace,
        SEND_WINDOW.key,
    )
    return now


async def apply_signal(
    connection: asyncpg.Connection,
    policy: RatePolicy,
    signal: Signal,
    *,
    cause: str,
    followup_id: int | None,
) -> RateChange | None:
    """Apply one signal; the change of the rate, if it changed. Call inside a transaction."""
    now = await lock_send_rate(connection)
    record = await connection.fetchrow(
        """SELECT limit_per_minute, delivered_in_a_row, throttled_at, raised_at
           FROM send_rate WHERE id = 1"""
    )
    state = RateState(**dict(record)) if record else RateState(policy.ceiling)
    following = next_state(state, signal, now, policy)
    if following != state or record is None:
        await connection.execute(
            """INSERT INTO send_rate
                   (id, limit_per_minute, delivered_in_a_row, throttled_at, raised_at, updated_at)
               VALUES (1, $1, $2, $3, $4, $5)
               ON CONFLICT (id) DO UPDATE
               SET limit_per_minute = excluded.limit_per_minute,
                   delivered_in_a_row = excluded.delivered_in_a_row,
                   throttled_at = excluded.throttled_at, raised_at = excluded.raised_at,
                   updated_at = excluded.updated_at""",
            following.limit_per_minute,
            following.delivered_in_a_row,
            following.throttled_at,
            following.raised_at,
            now,
        )
    previous = state.effective(policy)
    if following.limit_per_minute == previous:
        return None
    change = RateChange(now, following.limit_per_minute, previous, cause, followup_id)
    await connection.execute(
        """INSERT INTO send_rate_changes (at, limit_per_minute, previous_limit, cause, followup_id)
           VALUES ($1, $2, $3, $4, $5)""",
        change.at,
        change.limit_per_minute,
        change.previous_limit,
        change.cause,
        change.followup_id,
    )
    return change


async def current_rate(pool: asyncpg.Pool, ceiling: int) -> int:
    stored = await pool.fetchval("SELECT limit_per_minute FROM send_rate WHERE id = 1")
    return ceiling if stored is None else min(stored, ceiling)


async def recent_changes(pool: asyncpg.Pool, limit: int = 10) -> list[RateChange]:
    """The latest changes of the rate, newest first."""
    records = await pool.fetch(
        """SELECT at, limit_per_minute, previous_limit, cause, followup_id
           FROM send_rate_changes ORDER BY at DESC, id DESC LIMIT $1""",
        limit,
    )
    return [RateChange(**dict(r)) for r in records]


@dataclass(frozen=True)
class RateReport:
    ceiling: int
    current: int
    changes: list[RateChange]


async def rate_report(pool: asyncpg.Pool, ceiling: int, changes: int = 10) -> RateReport:
    """The rate in force (under `ceiling`) and its latest changes, newest first."""
    return RateReport(
        ceiling, await current_rate(pool, ceiling), await recent_changes(pool, changes)
    )
