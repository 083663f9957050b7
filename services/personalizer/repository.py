"""The personalizer's record: the rows a follow-up's text is built from, the prepared text kept
for the version it was written for, and a follow-up skipped before it is sent."""

from __future__ import annotations

from typing import Protocol

import asyncpg

from shared.occurrences import Ends, OccurrenceRecord
from shared.rows import (
    CONTEXT_JOINS,
    CONTEXT_SELECT,
    Followup,
    SendContext,
    context_from,
    row_columns,
)
from shared.transitions import LOG_TRANSITIONS

# The follow-up and what its text is built from, in one round trip: each join is driven by a
# primary key, so index lookups whatever plan the prepared statement settles on.
_WITH_CONTEXT = f"""
    SELECT {row_columns("f")}, {CONTEXT_SELECT}
    FROM contractor_followup_schedules AS f
    {CONTEXT_JOINS.format(f="f")}
    WHERE f.id = $1"""


class PersonalizerStore(Ends, Protocol):
    """What the personalizer's handlers need of the record."""

    async def get(self, followup_id: int) -> Followup | None: ...

    async def with_context(self, followup_id: int) -> tuple[Followup, SendContext | None] | None:
        """The follow-up and its contractor, action item and event (None: the contractor is
        gone); None when there is no such follow-up."""

    async def store_text(
        self,
        followup_id: int,
        version: int,
        *,
        text: str,
        source: str,
        fallback_reason: str | None,
        model: str | None,
        variant: str | None,
    ) -> bool: ...


class PersonalizerRepository(OccurrenceRecord):
    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, "personalizer")

    async def with_context(self, followup_id: int) -> tuple[Followup, SendContext | None] | None:
        record = await self._pool.fetchrow(_WITH_CONTEXT, followup_id)
        if record is None:
            return None
        return Followup.from_record(record), context_from(record)

    async def store_text(
        self,
        followup_id: int,
        version: int,
        *,
        text: str,
        source: str,
        fallback_reason: str | None,
        model: str | None,
        variant: str | None,
    ) -> bool:
        """Keep the prepared text for this version; False if the row moved on meanwhile. One
        statement, so one round trip: the update and its transition commit together."""
        done = await self._pool.fetchval(
            f"""WITH stored AS (
                    UPDATE contractor_followup_schedules
                    SET prepared_text = $3, prepared_version = version, prepared_at = now(),
                        text_source = $4, text_fallback_reason = $5, ai_model = $6,
                        prompt_variant = $7, updated_at = now()
                    WHERE id = $1 AND version = $2 AND status = 'scheduled'
                    RETURNING id),
                logged AS (
                    {LOG_TRANSITIONS}
                    SELECT id, 'personalizer', 'scheduled', 'scheduled', $8::jsonb FROM stored)
                SELECT id FROM stored""",
            followup_id,
            version,
            text,
            source,
            fallback_reason,
            model,
            variant,
            {"text_source": source, "fallback_reason": fallback_reason, "model": model},
        )
        return done is not None
