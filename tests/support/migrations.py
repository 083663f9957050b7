"""The migration that installs a database function whose text a module holds."""

from __future__ import annotations

import re

from shared.migrate import MIGRATIONS_DIR

DOWN = "-- migrate:down"


def newest_definition(function: str) -> str:
    """The up part of the newest migration that creates `function`, checked to create it once."""
    ups = [path.read_text().split(DOWN)[0] for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    defining = [up for up in ups if f"FUNCTION {function}" in up]
    assert defining, f"no migration creates {function}"
    up = defining[-1]
    assert len(re.findall(rf"CREATE (OR REPLACE )?FUNCTION {function}\b", up)) == 1
    return up
