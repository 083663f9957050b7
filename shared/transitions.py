"""The one way a follow-up's transition is written to `followup_transitions`: on its own
(`record_transition`), or as a step of the statement that makes it (`LOG_TRANSITIONS` followed by
a SELECT of the same five values), which saves the hot paths a round trip."""

from __future__ import annotations

from typing import Any

import asyncpg

LOG_TRANSITIONS = (
    "INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)"
)


async def record_transition(
    connection: asyncpg.Connection,
    followup_id: int,
    stage: str,
    from_status: str | None,
    to_status: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    await connection.execute(
        f"{LOG_TRANSITIONS} VALUES ($1, $2, $3, $4, $5)",
        followup_id,
        stage,
        from_status,
        to_status,
        detail or {},
    )
