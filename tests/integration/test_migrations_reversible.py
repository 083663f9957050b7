"""Every migration rolls back and applies again on a database of its own, and the send window's
per-second counts start from the calls already there when their migration is applied."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.migrate import MIGRATIONS_DIR, migrate, run_dbmate
from testbed.infra import PG_ADMIN
from tests.support.data import add_contractor, miscounted_seconds

COUNTS_MIGRATION = "20261203000001_send_window_counts.sql"


@pytest.fixture
async def fresh_url() -> AsyncIterator[str]:
    name = f"followups_reversible_{uuid.uuid4().hex[:10]}"
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def rollback(url: str) -> str:
    result = await asyncio.to_thread(run_dbmate, url, "rollback")
    assert result.returncode == 0, result.stderr or result.stdout
    return result.stdout


async def test_every_migration_rolls_back_and_applies_again(fresh_url):
    files = sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql"))
    await asyncio.to_thread(migrate, fresh_url)
    rolled_back = [await rollback(fresh_url) for _ in files]
    newest_first = zip(reversed(files), rolled_back, strict=True)
    assert all(f"Rolled back: {name}" in out for name, out in newest_first)
    report = await asyncio.to_thread(migrate, fresh_url)
    assert report.count("Applied:") == len(files)


async def test_the_counts_start_from_the_calls_present(fresh_url):
    await asyncio.to_thread(migrate, fresh_url)
    newer = [p for p in MIGRATIONS_DIR.glob("*.sql") if p.name > COUNTS_MIGRATION]
    for _ in newer:
        await rollback(fresh_url)
    assert COUNTS_MIGRATION in await rollback(fresh_url)
    connection = await asyncpg.connect(fresh_url)
    try:
        contractor = await add_contractor(connection)
        followup = await connection.fetchval(
            """INSERT INTO contractor_followup_schedules
                   (contractor_id, scheduled_time, followup_type, message_template,
                    idempotency_key)
               VALUES ($1, now(), 'check_in', 'Hi', 'reversible') RETURNING id""",
            contractor,
        )
        await connection.execute(
            """INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
               SELECT $1, gen_random_uuid(), 1, now() - random() * interval '2 minutes'
               FROM generate_series(1, 500)""",
            followup,
        )
        await asyncio.to_thread(migrate, fresh_url)
        assert await miscounted_seconds(connection) == []
    finally:
        await connection.close()
