"""`followups prune`: the retention of the audit tables, which otherwise grow forever.

Only rows of occurrences in a final state go (sent, cancelled, skipped, failed): a pending or
in-flight occurrence keeps its whole history. The cutoff is at least a day back, far behind the
send window, which looks back one minute at `webhook_calls`. Rows go in batches, each its own
transaction, walked in id order, so a long run holds no lock for long and shows its progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

import asyncpg
import typer

from services.cli.common import console, fail, load_settings, parse_duration, utcnow, with_pool

MIN_AGE = timedelta(days=1)
FINAL = ("sent", "cancelled", "skipped", "failed")


@dataclass(frozen=True)
class AuditTable:
    name: str
    time_column: str


AUDIT_TABLES = (
    AuditTable("followup_transitions", "at"),
    AuditTable("webhook_calls", "called_at"),
)


async def prune_table(
    pool: asyncpg.Pool,
    table: AuditTable,
    cutoff: datetime,
    batch: int,
) -> int:
    """Delete `table`'s rows older than `cutoff` of final occurrences; returns how many."""
    last_id = await pool.fetchval(
        f"SELECT max(id) FROM {table.name} WHERE {table.time_column} < $1", cutoff
    )
    removed = 0
    after = 0
    while last_id is not None and after < last_id:
        through, gone = await pool.fetchrow(
            f"""WITH candidates AS (
                    SELECT id FROM {table.name} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3),
                gone AS (
                    DELETE FROM {table.name} AS t USING contractor_followup_schedules AS f
                    WHERE t.id IN (SELECT id FROM candidates)
                      AND t.{table.time_column} < $4
                      AND f.id = t.followup_id AND f.status = ANY($5::text[])
                    RETURNING 1)
                SELECT (SELECT max(id) FROM candidates), (SELECT count(*) FROM gone)""",
            after,
            last_id,
            batch,
            cutoff,
            list(FINAL),
        )
        if through is None:
            break
        after = through
        removed += gone
        console.print(f"{table.name}: {removed:,} removed so far (through id {through:,})")
    return removed


def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="how old a row must be to go: 90d, 48h (at least 1d)",
            show_default=True,
        ),
    ] = "90d",
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="rows per transaction")] = 5_000,
) -> None:
    """Delete transitions and webhook calls older than the cutoff, of finished follow-ups only.

    Example: `followups prune --older-than 90d` (run daily by the production CronJob).
    """
    age = parse_duration(older_than)
    if age < MIN_AGE:
        raise fail(f"--older-than {older_than}: keep at least {MIN_AGE.days} day", 2)
    cutoff = utcnow() - age
    console.print(f"pruning rows older than {cutoff.isoformat(timespec='seconds')}")

    async def _prune(pool: asyncpg.Pool) -> dict[str, int]:
        return {table.name: await prune_table(pool, table, cutoff, batch) for table in AUDIT_TABLES}

    removed = with_pool(load_settings(), _prune)
    for name, count in removed.items():
        console.print(f"{name}: {count:,} rows removed")
