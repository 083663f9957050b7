"""The global send window: at most `limit` webhook calls in any `WINDOW`, across every dispatcher
replica, kept in PostgreSQL (`webhook_calls`) and taken in one round trip. `limit` is the adaptive
send rate (`send_rate`, see shared.send_rate), never above the configured ceiling.

`followups_start_call` does, under one transaction-scoped advisory lock (`shared.locks.SEND_WINDOW`,
two-key form, so it can never collide with a lock of another use):

1. reads the current rate (`send_rate`, written under the same lock; no row: the ceiling), then
   locks the row and checks it is still this claimant's (`claim_id`), still `sending` and not
   yet calling; if not (cancelled, moved, taken over) it answers `lost` and nothing may be sent.
   A cancel that commits after this waits for the row and finds the call under way;
2. honours the fleet-wide pause a 429 set (`gateway_pause`): answers when it ends;
3. counts the calls in the window (whole seconds from `webhook_call_seconds`, calls per Unix
   second kept by triggers on `webhook_calls`; the second the window starts in from the calls
   themselves: exact, and as cheap at 100 sends/s as at 1) and the follow-ups already waiting
   for a place, in the order places are handed out: priority (higher first), then due time,
   then id. The call may start when there are more free places than waiters ahead of it that
   are due now (within `DUE_SLACK`: a waiter whose time passed long ago is gone and does not
   hold a place up). It then records the call, marks the row as calling and starts its lease
   from this instant;
4. otherwise reads the window's calls themselves (only now, to tell when each place frees up;
   they also have the last word over the counts), marks the row as waiting and answers the
   instant of its own future place: with k waiters ahead, the k-th place that frees up (the
   window's oldest calls expire one by one, and the calls the waiters ahead make expire in
   their turn). Each place is so offered to one follow-up, and in order, instead of waking
   every waiter at the first opening.

Steps 2 to 4 judge the call at its own instant, `greatest(now, scheduled_time)`. The dispatcher
takes a first call's start up to `DISPATCH_CALL_LEAD_MS` ahead of its time, so that at the instant
only the POST is left, and it makes the call no earlier. So the call is recorded at that instant
(`webhook_calls.called_at`, `webhook_started_at`, `lateness_ms`), while the row is calling, and its
lease runs, from now: a cancel that commits after the start is too late, as during the call. The
count takes every call recorded since the window's start, those recorded at later instants than
this one included, so starts taken ahead, which may be recorded out of their instants' order,
still keep every minute within the limit.

Calls that start at the same moment go through `followups_start_calls_in_turn`: one round trip
and one transaction for the batch, the lock taken once, each follow-up's place decided by
`followups_start_call` in the window's own order (so a batch hands out places exactly as the
same calls one after another would).

The migrations that install these versions hold the same texts (a test compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from shared.locks import SEND_WINDOW

# One minute, plus a guard for the spread between recording a call and the gateway receiving it.
WINDOW = timedelta(seconds=60, milliseconds=500)
# A waiter ahead counts as "about to take its place" this long either side of its wake time.
DUE_SLACK = timedelta(seconds=2)

FUNCTION_SQL = """\
CREATE OR REPLACE FUNCTION followups_start_call(
    p_followup_id bigint, p_claim_id uuid, p_limit integer, p_window interval, p_lease interval,
    p_slack interval, p_lock_namespace integer, p_lock_key integer
) RETURNS TABLE (call_id bigint, frees_at timestamptz, lost boolean, current_limit integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_at timestamptz;
    v_until timestamptz;
    v_row contractor_followup_schedules%ROWTYPE;
    v_recent timestamptz[];
    v_free integer;
    v_ahead integer;
    v_due_ahead integer;
    v_turn integer;
    v_limit integer;
    v_edge bigint;
    v_calls bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_namespace, p_lock_key);
    v_now := clock_timestamp();
    -- the adaptive rate, never above the configured ceiling p_limit
    SELECT least(p_limit, r.limit_per_minute) INTO v_limit FROM send_rate AS r WHERE r.id = 1;
    v_limit := coalesce(v_limit, p_limit);
    SELECT * INTO v_row FROM contractor_followup_schedules AS f
    WHERE f.id = p_followup_id AND f.status = 'sending' AND f.claim_id = p_claim_id
      AND f.calling_since IS NULL
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::timestamptz, true, v_limit;
        RETURN;
    END IF;
    -- the call's instant: now, or its scheduled time when the start is taken ahead of it
    v_at := greatest(v_now, v_row.scheduled_time);
    SELECT g.paused_until INTO v_until FROM gateway_pause AS g WHERE g.paused_until > v_at;
    IF v_until IS NULL THEN
        -- the calls in the window that ends at the call's instant, and any recorded after it:
        -- whole seconds from their counts, the second the window starts in from the calls
        v_edge := floor(extract(epoch FROM v_at - p_window))::bigint;
        SELECT coalesce(sum(s.calls), 0) INTO v_calls
        FROM webhook_call_seconds AS s WHERE s.epoch_second > v_edge;
        v_calls := v_calls + (SELECT count(*) FROM webhook_calls AS w
                              WHERE w.called_at > v_at - p_window
                                AND w.called_at < to_timestamp(v_edge + 1));
        v_free := v_limit - least(v_calls, v_limit);
        SELECT count(*),
               count(*) FILTER (WHERE f.next_attempt_at BETWEEN v_at - p_slack AND v_at + p_slack)
        INTO v_ahead, v_due_ahead
        FROM contractor_followup_schedules AS f
        WHERE f.waiting_since IS NOT NULL AND f.status IN ('scheduled', 'sending')
          AND (f.priority > v_row.priority
               OR (f.priority = v_row.priority
                   AND (f.scheduled_time, f.id) < (v_row.scheduled_time, v_row.id)));
        IF v_free <= v_due_ahead THEN
            -- the window's calls that still hold a place, oldest first: read only when no
            -- place is free for this follow-up, to tell when each one frees up
            SELECT coalesce(array_agg(last.called_at ORDER BY last.called_at), '{}')
            INTO v_recent
            FROM (SELECT w.called_at FROM webhook_calls AS w WHERE w.called_at > v_at - p_window
                  ORDER BY w.called_at DESC LIMIT v_limit) AS last;
            v_free := v_limit - cardinality(v_recent);
        END IF;
        IF v_free > v_due_ahead THEN
            DELETE FROM webhook_call_seconds AS s WHERE s.epoch_second < v_edge;
            UPDATE contractor_followup_schedules AS f
            SET calling_since = v_now, lease_until = v_now + p_lease, waiting_since = NULL,
                webhook_started_at = coalesce(f.webhook_started_at, v_at),
                lateness_ms = coalesce(f.lateness_ms,
                                       extract(epoch FROM v_at - f.scheduled_time) * 1000)
            WHERE f.id = p_followup_id;
            RETURN QUERY
                INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
                VALUES (p_followup_id, v_row.send_key, v_row.attempts, v_at)
                RETURNING webhook_calls.id, NULL::timestamptz, false, v_limit;
            RETURN;
        END IF;
        -- the v_ahead-th place to come (0 is the next): places repeat every window
        v_turn := v_ahead % v_limit;
        IF v_turn < v_free THEN
            v_until := v_at;
        ELSE
            v_until := v_recent[v_turn - v_free + 1] + p_window;
        END IF;
        v_until := v_until + p_window * (v_ahead / v_limit);
    END IF;
    UPDATE contractor_followup_schedules AS f
    SET waiting_since = coalesce(f.waiting_since, v_now), next_attempt_at = v_until
    WHERE f.id = p_followup_id;
    RETURN QUERY SELECT NULL::bigint, v_until, false, v_limit;
END;
$$;
"""


# Calls that start together take their places in one transaction: the window's lock once, one
# round trip and one commit for all of them, in the order the window hands out places.
START_BATCH = 64

BATCH_FUNCTION_SQL = """\
CREATE OR REPLACE FUNCTION followups_start_calls_in_turn(
    p_followup_ids bigint[], p_claim_ids uuid[], p_limit integer, p_window interval,
    p_lease interval, p_slack interval, p_lock_namespace integer, p_lock_key integer
) RETURNS TABLE (followup_id bigint, call_id bigint, frees_at timestamptz, lost boolean,
                 current_limit integer)
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_followup_ids), 0) LOOP
        RETURN QUERY
            SELECT p_followup_ids[i], s.call_id, s.frees_at, s.lost, s.current_limit
            FROM followups_start_call(p_followup_ids[i], p_claim_ids[i], p_limit, p_window,
                                      p_lease, p_slack, p_lock_namespace, p_lock_key) AS s;
    END LOOP;
END;
$$;
"""


@dataclass(frozen=True)
class CallWanted:
    """A claimed follow-up whose call is due now, and what its place is counted with."""

    followup_id: int
    claim_id: UUID
    priority: int
    scheduled_time: datetime
    limit_per_minute: int
    lease: timedelta


@dataclass(frozen=True)
class CallSlot:
    """A call id when the call may start now; else `frees_at`, the instant of this follow-up's
    place; or `lost` when the row is no longer this claimant's to send."""

    call_id: int | None
    frees_at: datetime | None
    lost: bool = False
    limit_per_minute: int | None = None  # the rate the window was counted at


def _turn(wanted: CallWanted) -> tuple[int, datetime, int]:
    """The window's own order: priority (higher first), then due time, then id."""
    return -wanted.priority, wanted.scheduled_time, wanted.followup_id


async def start_calls(pool: asyncpg.Pool, batch: Sequence[CallWanted]) -> list[CallSlot]:
    """Each follow-up's place (`followups_start_call`), taken in the window's order in one
    transaction; answered in the order of `batch`. Calls counted under different ceilings or
    leases (never within one dispatcher) go in one transaction each."""
    answers: dict[int, CallSlot] = {}
    for (limit, lease), group in _by_terms(batch).items():
        ordered = sorted(group, key=_turn)
        records = await pool.fetch(
            "SELECT followup_id, call_id, frees_at, lost, current_limit"
            " FROM followups_start_calls_in_turn($1, $2, $3, $4, $5, $6, $7, $8)",
            [wanted.followup_id for wanted in ordered],
            [wanted.claim_id for wanted in ordered],
            limit,
            WINDOW,
            lease,
            DUE_SLACK,
            SEND_WINDOW.namespace,
            SEND_WINDOW.key,
        )
        for wanted, record in zip(ordered, records, strict=True):
            if record["followup_id"] != wanted.followup_id:
                raise RuntimeError("followups_start_calls_in_turn answered out of order")
            answers[id(wanted)] = CallSlot(
                call_id=record["call_id"],
                frees_at=record["frees_at"],
                lost=record["lost"],
                limit_per_minute=record["current_limit"],
            )
    return [answers[id(wanted)] for wanted in batch]


def _by_terms(batch: Sequence[CallWanted]) -> dict[tuple[int, timedelta], list[CallWanted]]:
    groups: dict[tuple[int, timedelta], list[CallWanted]] = {}
    for wanted in batch:
        groups.setdefault((wanted.limit_per_minute, wanted.lease), []).append(wanted)
    return groups
