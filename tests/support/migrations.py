"""The migration that installs a database function whose text a module holds, and what the
database runs."""

from __future__ import annotations

import re

import asyncpg

from shared.migrate import MIGRATIONS_DIR

DOWN = "-- migrate:down"


def newest_definition(function: str) -> str:
    """The up part of the newest migration that creates `function`, checked to create it once."""
    ups = [path.read_text().split(DOWN)[0] for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    creates = re.compile(rf"CREATE (OR REPLACE )?FUNCTION {function}\b")
    defining = [up for up in ups if creates.search(up)]
    assert defining, f"no migration creates {function}"
    up = defining[-1]
    assert len(creates.findall(up)) == 1
    return up


async def installed_body(pool: asyncpg.Pool, function: str) -> str:
    """The body (between the `$$`) of `function` as the database holds it."""
    body: str = await pool.fetchval("SELECT prosrc FROM pg_proc WHERE proname = $1", function)
    return body
