-- migrate:up
-- What a dispatcher does for many follow-ups at the same moment, in one statement each: the
-- texts of CLAIM_FUNCTION_SQL and MARK_SENT_FUNCTION_SQL in services/dispatcher/statements.py
-- and BATCH_FUNCTION_SQL in services/dispatcher/send_window.py, which document them.
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
        SELECT coalesce(array_agg(l.id), '{}') INTO v_locked
        FROM (SELECT f.id FROM contractor_followup_schedules AS f WHERE f.id = ANY(p_ids)
              ORDER BY f.id FOR UPDATE) AS l;
    ELSE
        SELECT coalesce(array_agg(l.id), '{}') INTO v_locked
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
        INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
        SELECT (u.followup).id, 'dispatcher', u.from_status, 'sending',
               jsonb_strip_nulls(jsonb_build_object(
                   'attempt', (u.followup).attempts, 'takeover', u.from_status = 'sending',
                   'resumed', CASE WHEN u.resumed THEN true END))
        FROM updated AS u)
    SELECT NULL::bigint, u.from_status, u.resumed, u.followup FROM updated AS u;
END;
$$;

CREATE OR REPLACE FUNCTION followups_mark_sent(
    p_ids bigint[], p_sent_by text[], p_notes text[], p_fallback_reasons text[],
    p_http_statuses integer[], p_call_ids bigint[], p_claim_ids uuid[]
) RETURNS TABLE (recorded_claim_id uuid, sent contractor_followup_schedules)
LANGUAGE plpgsql ROWS 10
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH done AS (
        SELECT * FROM unnest(p_ids, p_sent_by, p_notes, p_fallback_reasons, p_http_statuses,
                             p_call_ids, p_claim_ids)
            AS d(id, sent_by, note, fallback_reason, http_status, call_id, claim_id)),
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
            updated_at = now()
        FROM owned AS d
        WHERE f.id = d.id
        RETURNING d.claim_id AS owner, f AS followup),
    logged AS (
        INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
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

-- migrate:down
DROP FUNCTION followups_start_calls_in_turn(bigint[], uuid[], integer, interval, interval,
                                            interval, integer, integer);
DROP FUNCTION followups_mark_sent(bigint[], text[], text[], text[], integer[], bigint[], uuid[]);
DROP FUNCTION followups_claim(bigint[], integer[], interval[], interval[], uuid[], boolean);
