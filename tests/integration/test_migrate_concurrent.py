"""`followups migrate` run by several pods at once (an init container in each service): on a
server without the database yet, every run succeeds and each migration is applied once."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg

from shared.migrate import MIGRATIONS_DIR, migrate
from testbed.infra import PG_ADMIN

RUNS = 3


async def test_concurrent_runs_on_a_fresh_database_apply_each_migration_once():
    name = f"followups_migrate_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    files = sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql"))
    assert files
    try:
        reports = await asyncio.gather(*(asyncio.to_thread(migrate, url) for _ in range(RUNS)))
        applied = [m for report in reports for m in re.findall(r"^Applied: (\S+)", report, re.M)]
        assert sorted(applied) == files, reports
        connection = await asyncpg.connect(url)
        try:
            versions = await connection.fetch("SELECT version FROM schema_migrations")
        finally:
            await connection.close()
        assert sorted(row["version"] for row in versions) == [f.split("_")[0] for f in files]
        # A run after them all has nothing to do.
        assert "Applying" not in await asyncio.to_thread(migrate, url)
        print(f"\n{RUNS} concurrent runs: {len(applied)} migrations applied once each")
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
