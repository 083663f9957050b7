-- migrate:up
-- A send's record takes how late its POST left: the row's lateness is the later of the call's
-- recorded start and the POST's own. The text of MARK_SENT_FUNCTION_SQL in
-- services/dispatcher/statements.py, which documents it. The new argument has a default, so a
-- dispatcher of the release before it, still running during a rolling update, records its sends
-- as it did.
DROP FUNCTION followups_mark_sent(bigint[], text[], text[], text[], integer[], bigint[], uuid[]);
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

-- migrate:down
DROP FUNCTION followups_mark_sent(bigint[], text[], text[], text[], integer[], bigint[], uuid[],
                                  double precision[]);
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
