"""The personalizer's record: the rows a follow-up's text is built from, the prepared text kept
for the version it was written for, and a follow-up skipped before it is sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import asyncpg

from shared.batching import Coalescer, as_columns
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
    {CONTEXT_JOINS.format(f="f")}"""
_ONE = " WHERE f.id = $1"
_MANY = " WHERE f.id = ANY($1::bigint[])"

# The prepared text kept for the version it was written for, and its transition, in one
# statement: the update and the transition commit together. `wanted` is the texts to keep.
_STORE_TEXT = f"""
    WITH wanted AS ({{wanted}}),
    stored AS (
        UPDATE contractor_followup_schedules AS f
        SET prepared_text = w.text, prepared_version = f.version, prepared_at = now(),
            text_source = w.source, text_fallback_reason = w.fallback_reason,
            ai_model = w.model, prompt_variant = w.variant, updated_at = now()
        FROM wanted AS w
        WHERE f.id = w.id AND f.version = w.version AND f.status = 'scheduled'
        RETURNING f.id, f.version, w.detail),
    logged AS (
        {LOG_TRANSITIONS}
        SELECT id, 'personalizer', 'scheduled', 'scheduled', detail FROM stored)
    SELECT id, version FROM stored"""
_STORE_ONE = _STORE_TEXT.format(
    wanted="SELECT $1::bigint AS id, $2::integer AS version, $3::text AS text,"
    " $4::text AS source, $5::text AS fallback_reason, $6::text AS model, $7::text AS variant,"
    " $8::jsonb AS detail"
)
_STORE_MANY = _STORE_TEXT.format(
    wanted="SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[],"
    " $5::text[], $6::text[], $7::text[], $8::jsonb[])"
    " AS w (id, version, text, source, fallback_reason, model, variant, detail)"
)

# Reads and writes that come while one is in flight go together in the next round trip (the
# personalizer's prefetch bounds how many can).
BATCH = 64


@dataclass(frozen=True)
class Text:
    """A follow-up's text and where it came from."""

    text: str
    source: str  # 'ai' or 'template'
    fallback_reason: str | None
    model: str | None
    variant: str | None

    @property
    def detail(self) -> dict[str, str | None]:
        return {
            "text_source": self.source,
            "fallback_reason": self.fallback_reason,
            "model": self.model,
        }


@dataclass(frozen=True)
class PreparedText:
    """A text to keep for the version of the follow-up it was written for."""

    followup_id: int
    version: int
    text: Text


class PersonalizerStore(Ends, Protocol):
    """What the personalizer's handlers need of the record."""

    async def get(self, followup_id: int) -> Followup | None: ...

    async def with_context(
        self, followup_id: int, *, linger: float = 0.0
    ) -> tuple[Followup, SendContext | None] | None:
        """The follow-up and its contractor, action item and event (None: the contractor is
        gone); None when there is no such follow-up. `linger`: seconds this read may wait for
        others to join it."""

    async def store_text(self, prepared: PreparedText, *, linger: float = 0.0) -> bool:
        """Keep the text for its version; False if the row moved on meanwhile. `linger`:
        seconds this write may wait for others to join it."""


class PersonalizerRepository(OccurrenceRecord):
    """Reads and writes of the texts; those made at the same time go together, one round trip
    each (a batch of one in the statement for one row, planned once per connection)."""

    def __init__(self, pool: asyncpg.Pool, *, in_flight: int = BATCH) -> None:
        super().__init__(pool, "personalizer")
        # Every timer the service holds reads first: a batch of reads that holds them all is
        # full, as no other can come to join it until one is answered.
        self._reads = Coalescer(self._read_batch, max_batch=min(BATCH, in_flight))
        self._writes = Coalescer(self._write_batch, max_batch=BATCH)

    async def with_context(
        self, followup_id: int, *, linger: float = 0.0
    ) -> tuple[Followup, SendContext | None] | None:
        return await self._reads.submit(followup_id, linger=linger)

    async def store_text(self, prepared: PreparedText, *, linger: float = 0.0) -> bool:
        return await self._writes.submit(prepared, linger=linger)

    async def _read_batch(
        self, batch: Sequence[int]
    ) -> list[tuple[Followup, SendContext | None] | None]:
        if len(batch) == 1:
            records = await self._pool.fetch(_WITH_CONTEXT + _ONE, batch[0])
        else:
            records = await self._pool.fetch(_WITH_CONTEXT + _MANY, list(set(batch)))
        found = {
            record["id"]: (Followup.from_record(record), context_from(record)) for record in records
        }
        return [found.get(followup_id) for followup_id in batch]

    async def _write_batch(self, batch: Sequence[PreparedText]) -> list[bool]:
        # The same follow-up twice in one batch (a timer and its duplicate): the first is kept.
        firsts = {prepared.followup_id: prepared for prepared in reversed(batch)}
        first = list(firsts.values())
        columns = [*as_columns(first, *_COLUMNS), [prepared.text.detail for prepared in first]]
        if len(first) == 1:
            records = await self._pool.fetch(_STORE_ONE, *(column[0] for column in columns))
        else:
            records = await self._pool.fetch(_STORE_MANY, *columns)
        kept = {(record["id"], record["version"]) for record in records}
        return [
            firsts[prepared.followup_id] is prepared
            and (prepared.followup_id, prepared.version) in kept
            for prepared in batch
        ]


# The statement's parameters before the transition's detail, in its order.
_COLUMNS = ("followup_id", "version", *(f"text.{field.name}" for field in fields(Text)))
