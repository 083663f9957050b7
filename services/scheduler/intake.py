"""Storing a `followup.requested` once per idempotency key, in one round trip.

`followups_insert_request` does, in the one transaction of the statement that calls it:

1. takes the key's transaction-scoped advisory lock (`hashtext(key)`), which serialises it with a
   cancel of the same key (shared by the cancel's own statement), so one of the two sees the
   other: each statement of a PL/pgSQL function reads a snapshot taken when it starts, after the
   lock is held;
2. answers `foreign_item` when the action item named belongs to another contractor: that item
   would be put in this contractor's SMS and decide its skip_if_completed, so it counts as a
   reference that does not exist (an item that does not exist at all fails the insert's foreign
   key, as a missing contractor or event does);
3. inserts the row: `cancelled` when a cancel for the key came first, `skipped` when the
   contractor opted out or their phone can't take an SMS, else `scheduled`; a recurring one is
   the first of its series; the transition is logged;
4. answers `existing` with the stored row when the key was there already.

Without the function the same steps took four round trips (BEGIN, the lock, the insert, COMMIT).

Requests that arrive together go through `followups_insert_requests`: one round trip and one
transaction for the batch, each request stored by `followups_insert_request` in a subtransaction
of its own. The keys' locks are taken in one order (by their hash), so two batches that share
keys never deadlock. A request that fails (a reference that does not exist, say) is answered
`failed` and stored again alone, where it fails as it would have on its own, and its batch-mates
are stored regardless.

The migration that installs these versions holds the same texts (a test compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import asyncpg

from shared.batching import as_columns
from shared.rows import Contractor, Followup, row_columns
from shared.schemas import FollowupRequested
from shared.transitions import LOG_TRANSITIONS

_UNDELIVERABLE = Contractor.COMPUTED["undeliverable"].format(t="c")

FUNCTION_SQL = f"""\
CREATE OR REPLACE FUNCTION followups_insert_request(
    p_contractor_id bigint, p_action_item_id bigint, p_event_id bigint,
    p_scheduled_time timestamptz, p_followup_type text, p_message_template text,
    p_message_tone text, p_ai_should_personalize boolean, p_ai_context_hints jsonb,
    p_skip_if_completed boolean, p_is_recurring boolean, p_recurrence_interval_days integer,
    p_idempotency_key text, p_priority smallint, p_requested_by text
) RETURNS TABLE (outcome text, followup contractor_followup_schedules)
LANGUAGE plpgsql AS $$
DECLARE
    v_row contractor_followup_schedules%ROWTYPE;
    v_owner bigint;
    v_opted_out boolean;
    v_undeliverable boolean;
    v_cancelled text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(p_idempotency_key));
    IF p_action_item_id IS NOT NULL THEN
        SELECT i.contractor_id INTO v_owner
        FROM contractor_action_items AS i WHERE i.id = p_action_item_id;
        IF v_owner IS NOT NULL AND v_owner <> p_contractor_id THEN
            RETURN QUERY SELECT 'foreign_item'::text, NULL::contractor_followup_schedules;
            RETURN;
        END IF;
    END IF;
    SELECT c.sms_opt_out,
           -- a permanent delivery failure for the phone it still has
           {_UNDELIVERABLE}
    INTO v_opted_out, v_undeliverable
    FROM contractors AS c WHERE c.id = p_contractor_id;
    SELECT coalesce(k.reason, 'cancel_requested') INTO v_cancelled
    FROM cancelled_keys AS k WHERE k.idempotency_key = p_idempotency_key;
    INSERT INTO contractor_followup_schedules AS f (
        contractor_id, action_item_id, event_id, scheduled_time, followup_type,
        message_template, message_tone, ai_should_personalize, ai_context_hints,
        skip_if_completed, is_recurring, recurrence_interval_days, idempotency_key, priority,
        requested_by, status, status_reason)
    VALUES (
        p_contractor_id, p_action_item_id, p_event_id, p_scheduled_time, p_followup_type,
        p_message_template, p_message_tone, p_ai_should_personalize, p_ai_context_hints,
        p_skip_if_completed, p_is_recurring, p_recurrence_interval_days, p_idempotency_key,
        p_priority, p_requested_by,
        CASE WHEN v_cancelled IS NOT NULL THEN 'cancelled'
             WHEN v_opted_out OR v_undeliverable THEN 'skipped'
             ELSE 'scheduled' END,
        coalesce(v_cancelled, CASE WHEN v_opted_out THEN 'opted_out'
                                   WHEN v_undeliverable THEN 'undeliverable' END))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING f.* INTO v_row;
    IF NOT FOUND THEN
        SELECT f.* INTO v_row FROM contractor_followup_schedules AS f
        WHERE f.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT 'existing'::text, v_row;
        RETURN;
    END IF;
    IF v_row.is_recurring THEN
        UPDATE contractor_followup_schedules AS f SET series_id = f.id WHERE f.id = v_row.id
        RETURNING f.* INTO v_row;
    END IF;
    {LOG_TRANSITIONS}
    VALUES (v_row.id, 'scheduler', NULL, v_row.status,
            jsonb_build_object('scheduled_time', v_row.scheduled_time,
                               'reason', v_row.status_reason));
    RETURN QUERY SELECT 'created'::text, v_row;
END;
$$;
"""

BATCH_FUNCTION_SQL = """\
CREATE OR REPLACE FUNCTION followups_insert_requests(
    p_contractor_ids bigint[], p_action_item_ids bigint[], p_event_ids bigint[],
    p_scheduled_times timestamptz[], p_followup_types text[], p_message_templates text[],
    p_message_tones text[], p_ai_should_personalize boolean[], p_ai_context_hints jsonb[],
    p_skip_if_completed boolean[], p_is_recurring boolean[], p_recurrence_interval_days integer[],
    p_idempotency_keys text[], p_priorities smallint[], p_requested_by text[]
) RETURNS TABLE (request_index integer, outcome text, followup contractor_followup_schedules)
LANGUAGE plpgsql ROWS 10 AS $$
DECLARE
    i integer;
BEGIN
    FOR i IN SELECT k.n FROM unnest(p_idempotency_keys) WITH ORDINALITY AS k(key, n)
             ORDER BY hashtext(k.key), k.n LOOP
        BEGIN
            RETURN QUERY
                SELECT i, r.outcome, r.followup
                FROM followups_insert_request(
                    p_contractor_ids[i], p_action_item_ids[i], p_event_ids[i],
                    p_scheduled_times[i], p_followup_types[i], p_message_templates[i],
                    p_message_tones[i], p_ai_should_personalize[i], p_ai_context_hints[i],
                    p_skip_if_completed[i], p_is_recurring[i], p_recurrence_interval_days[i],
                    p_idempotency_keys[i], p_priorities[i], p_requested_by[i]) AS r;
        EXCEPTION WHEN OTHERS THEN
            RETURN QUERY SELECT i, 'failed'::text, NULL::contractor_followup_schedules;
        END;
    END LOOP;
END;
$$;
"""

_CALL = f"""
    SELECT r.outcome, {row_columns("(r.followup)")}
    FROM followups_insert_request($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                  $14, $15) AS r"""


_BATCH_CALL = f"""
    SELECT r.request_index, r.outcome, {row_columns("(r.followup)")}
    FROM followups_insert_requests($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                   $14, $15) AS r"""


class Stored(StrEnum):
    CREATED = "created"
    EXISTING = "existing"
    FOREIGN_ITEM = "foreign_item"
    FAILED = "failed"  # in a batch only: stored again alone, to fail there as it would


# The request's fields in the order both functions take them; the key goes between the two.
_BEFORE_KEY = (
    "contractor_id",
    "action_item_id",
    "event_id",
    "scheduled_time",
    "followup_type",
    "message_template",
    "message_tone",
    "ai_should_personalize",
    "ai_context_hints",
    "skip_if_completed",
    "is_recurring",
    "recurrence_interval_days",
)
_AFTER_KEY = ("priority", "requested_by")


async def insert_request(
    pool: asyncpg.Pool, request: FollowupRequested, key: str
) -> tuple[Stored, Followup | None]:
    """What became of the request, and its row (None for `foreign_item`)."""
    arguments = [column[0] for column in _arguments([(request, key)])]
    record = await pool.fetchrow(_CALL, *arguments)
    assert record is not None
    return _stored(record)


async def insert_requests(
    pool: asyncpg.Pool, batch: Sequence[tuple[FollowupRequested, str]]
) -> list[tuple[Stored, Followup | None]]:
    """What became of each (request, key) of `batch`, in its order, stored in one transaction;
    `failed` for one that must be stored alone."""
    records = await pool.fetch(_BATCH_CALL, *_arguments(batch))
    answers = {record["request_index"]: _stored(record) for record in records}
    return [answers[n] for n in range(1, len(batch) + 1)]


def _arguments(batch: Sequence[tuple[FollowupRequested, str]]) -> list[list[Any]]:
    """One list per argument of the functions, an entry per request."""
    requests = [request for request, _ in batch]
    return [
        *as_columns(requests, *_BEFORE_KEY),
        [key for _, key in batch],
        *as_columns(requests, *_AFTER_KEY),
    ]


def _stored(record: asyncpg.Record) -> tuple[Stored, Followup | None]:
    stored = Stored(record["outcome"])
    if stored in (Stored.FOREIGN_ITEM, Stored.FAILED):
        return stored, None
    return stored, Followup.from_record(record)
