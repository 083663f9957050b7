-- migrate:up
-- A follow-up request stored in one round trip instead of four (BEGIN, the key's lock, the
-- insert, COMMIT). The text of FUNCTION_SQL in services/scheduler/intake.py, which documents it.
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
           regexp_replace(c.undeliverable_phone, '[^0-9]', '', 'g') = regexp_replace(c.phone, '[^0-9]', '', 'g')
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
    INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
    VALUES (v_row.id, 'scheduler', NULL, v_row.status,
            jsonb_build_object('scheduled_time', v_row.scheduled_time,
                               'reason', v_row.status_reason));
    RETURN QUERY SELECT 'created'::text, v_row;
END;
$$;

-- migrate:down
DROP FUNCTION followups_insert_request(
    bigint, bigint, bigint, timestamptz, text, text, text, boolean, jsonb, boolean, boolean,
    integer, text, smallint, text);
