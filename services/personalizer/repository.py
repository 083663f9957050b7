"""The personalizer's record: the rows a follow-up's text is built from, the prepared text kept
for the version it was written for, and a follow-up skipped before it is sent."""

from __future__ import annotations

from typing import Protocol

import asyncpg

from shared.occurrences import Ends, OccurrenceRecord
from shared.rows import CONTEXT_SELECT, Followup, SendContext, context_from
from shared.transitions import LOG_TRANSITIONS

# Driven by the contractor's primary key, the other two by theirs: index lookups whatever plan
# the prepared statement settles on.
_CONTEXT = f"""
    SELECT {CONTEXT_SELECT}
    FROM contractors AS c
    LEFT JOIN contractor_action_items AS a ON a.id = $2
    LEFT JOIN events AS e ON e.id = $3
    WHERE c.id = $1"""


class PersonalizerStore(Ends, Protocol):
    """What the personalizer's handlers need of the record."""

    async def get(self, followup_id: int) -> Followup | None: ...

    async def context(self, row: Followup) -> SendContext | None: ...

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

    async def context(self, row: Followup) -> SendContext | None:
        """The contractor, action item and event of a follow-up; None if the contractor is gone."""
        record = await self._pool.fetchrow(
            _CONTEXT, row.contractor_id, row.action_item_id, row.event_id
        )
        return context_from(record) if record else None

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
