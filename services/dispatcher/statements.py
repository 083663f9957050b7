"""The dispatcher's statements for many follow-ups at once, as database functions: a batch of
claims (`followups_claim`) and a batch of sends recorded (`followups_mark_sent`). Each decides
every row by the same conditions as if it came alone, and locks the rows in id order, so two
dispatchers whose batches overlap never deadlock. A batch of claims skips a row that another
transaction holds, and its caller claims it alone: one slow lock holds up no other claim.

They are functions for their plans: a statement over arrays is planned for each call (its plan
for a batch of one looks cheaper than one plan for any batch, so PostgreSQL never keeps one), and
that planning cost more than the claim itself. A function keeps one plan per connection
(`plan_cache_mode = force_generic_plan`), and the plan looks rows up by id whatever the batch.

The migration that installs these versions holds the same texts (a test compares them).
"""

from __future__ import annotations

from shared.transitions import LOG_TRANSITIONS

# Per follow-up: its id (each once), the timer's version, the lease, how early it may be claimed,
# and the claim id its caller held and let go of (or null). A row is claimed when the version
# matches, it is due (within `early`), and it is `scheduled` and not waiting, or `sending` under
# a lease that ran out or under the claim id its caller names. The rows are locked first, in id
# order. Without `p_wait`, a row another transaction holds is left out and answered as busy
# (`busy_id`): its caller claims it alone, so one slow lock never holds up a batch.
CLAIM_FUNCTION_SQL = f"""\
CREATE OR REPLACE FUNCTION followups_claim(
    p_ids bigint[], p_versions integer[], p_leases interval[], p_early interval[],
    p_resumes uuid[], p_wait boolean
) RETURNS TABLE (busy_id bigint, claimed_from text, taken_back boolean,
                 claimed contractor_followup_schedules)
LANGUAGE plpgsql ROWS 10
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_locked bigint[];
BEGIN
    IF p_wait THEN
        SELECT coalesce(array_agg(l.id), '{{}}') INTO v_locked
        FROM (SELECT f.id FROM contractor_followup_schedules AS f WHERE f.id = ANY(p_ids)
              ORDER BY f.id FOR UPDATE) AS l;
    ELSE
        SELECT coalesce(array_agg(l.id), '{{}}') INTO v_locked
        FROM (SELECT f.id FROM contractor_followup_schedules AS f WHERE f.id = ANY(p_ids)
              ORDER BY f.id FOR UPDATE SKIP LOCKED) AS l;
        RETURN QUERY
            SELECT b.id, NULL::text, NULL::boolean, NULL::contractor_followup_schedules
            FROM unnest(p_ids) AS b(id) WHERE b.id <> ALL(v_locked);
    END IF;
    -- the rows are locked: this statement reads what the update sees
    RETURN QUERY
    WITH wanted AS (
        SELECT * FROM unnest(p_ids, p_versions, p_leases, p_early, p_resumes)
            AS w(id, version, lease, early, resume)),
    -- materialized: found by id, then decided on (inlined, the planner scans by status)
    previous AS MATERIALIZED (
        SELECT f.id, f.version, f.status, f.claim_id, f.scheduled_time, f.next_attempt_at,
               f.lease_until, f.calling_since
        FROM contractor_followup_schedules AS f
        WHERE f.id = ANY(v_locked)),
    taken AS (
        SELECT p.id, p.status, w.lease, p.claim_id = w.resume AS resumed,
               -- taken back by its own process before its call started: the same attempt
               p.claim_id = w.resume AND p.calling_since IS NULL AS same_attempt
        FROM previous AS p JOIN wanted AS w USING (id)
        WHERE p.version = w.version
          AND p.scheduled_time <= clock_timestamp() + w.early
          AND ((p.status = 'scheduled' AND (p.next_attempt_at IS NULL
                                            OR p.next_attempt_at <= clock_timestamp()))
               OR (p.status = 'sending' AND (p.lease_until < clock_timestamp()
                                             OR p.claim_id = w.resume)))),
    updated AS (
        UPDATE contractor_followup_schedules AS f
        SET status = 'sending', claim_id = gen_random_uuid(), claimed_at = clock_timestamp(),
            lease_until = clock_timestamp() + t.lease, calling_since = NULL,
            attempts = f.attempts + CASE WHEN t.same_attempt THEN 0 ELSE 1 END,
            updated_at = now()
        FROM taken AS t
        WHERE f.id = t.id
        RETURNING t.status AS from_status, t.resumed, f AS followup),
    logged AS (
        {LOG_TRANSITIONS}
        SELECT (u.followup).id, 'dispatcher', u.from_status, 'sending',
               jsonb_strip_nulls(jsonb_build_object(
                   'attempt', (u.followup).attempts, 'takeover', u.from_status = 'sending',
                   'resumed', CASE WHEN u.resumed THEN true END))
        FROM updated AS u)
    SELECT NULL::bigint, u.from_status, u.resumed, u.followup FROM updated AS u;
END;
$$;
"""

# Per send: its id, sent_by, note, text fallback reason, HTTP status, webhook call id, claim id
# and how late the POST left (ms). Only the claim's owner records it. A cancel or reschedule kept
# during the call came too late: the row says so. The row's lateness is the later of the call's
# recorded start and the POST's own: a start taken ahead is recorded at the instant, and the
# POST's wake-up after it is what a reader of `lateness_ms` wants to see. Without the last array
# (a dispatcher of the release before it) the recorded start stands.
MARK_SENT_FUNCTION_SQL = f"""\
CREATE OR REPLACE FUNCTION followups_mark_sent(
    p_ids bigint[], p_sent_by text[], p_notes text[], p_fallback_reasons text[],
    p_http_statuses integer[], p_call_ids bigint[], p_claim_ids uuid[],
    p_lateness_ms double precision[] DEFAULT NULL
) RETURNS TABLE (recorded_claim_id uuid, sent contractor_followup_schedules)
LANGUAGE plpgsql ROWS 10
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH done AS (
        SELECT * FROM unnest(p_ids, p_sent_by, p_notes, p_fallback_reasons, p_http_statuses,
                             p_call_ids, p_claim_ids, p_lateness_ms)
            AS d(id, sent_by, note, fallback_reason, http_status, call_id, claim_id, lateness_ms)),
    locked AS (
        SELECT f.id, f.status, f.claim_id FROM contractor_followup_schedules AS f
        WHERE f.id = ANY(p_ids)
        ORDER BY f.id
        FOR UPDATE),
    owned AS (
        SELECT d.* FROM locked AS l JOIN done AS d USING (id)
        WHERE l.status = 'sending' AND l.claim_id = d.claim_id),
    call AS (
        UPDATE webhook_calls AS w SET finished_at = clock_timestamp(), outcome = 'sent',
            http_status = d.http_status
        FROM done AS d
        WHERE w.id = ANY(p_call_ids) AND w.id = d.call_id),
    updated AS (
        UPDATE contractor_followup_schedules AS f
        SET status = 'sent', sent_at = clock_timestamp(), sent_by = d.sent_by,
            status_reason = CASE WHEN f.cancel_requested_at IS NOT NULL THEN 'cancel_too_late'
                                 WHEN f.reschedule_to IS NOT NULL THEN 'reschedule_too_late'
                                 ELSE d.note END,
            lease_until = NULL, last_error = NULL, calling_since = NULL, claim_id = NULL,
            waiting_since = NULL,
            text_source = CASE WHEN d.fallback_reason IS NULL
                               THEN coalesce(f.text_source, 'template')
                               ELSE 'template' END,
            text_fallback_reason = coalesce(d.fallback_reason, f.text_fallback_reason),
            lateness_ms = greatest(f.lateness_ms, d.lateness_ms),
            updated_at = now()
        FROM owned AS d
        WHERE f.id = d.id
        RETURNING d.claim_id AS owner, f AS followup),
    logged AS (
        {LOG_TRANSITIONS}
        SELECT (u.followup).id, 'dispatcher', 'sending', 'sent',
               jsonb_build_object('sent_by', (u.followup).sent_by, 'attempt', (u.followup).attempts,
                                  'lateness_ms', (u.followup).lateness_ms)
        FROM updated AS u
        UNION ALL
        SELECT (u.followup).id, 'dispatcher', 'sent', 'sent',
               jsonb_strip_nulls(jsonb_build_object(
                   'too_late', true, 'cancel_requested', (u.followup).cancel_reason,
                   'reschedule_requested', (u.followup).reschedule_to))
        FROM updated AS u
        WHERE (u.followup).cancel_requested_at IS NOT NULL
           OR (u.followup).reschedule_to IS NOT NULL)
    SELECT u.owner, u.followup FROM updated AS u;
END;
$$;
"""
