-- migrate:up
-- Requests that arrive together stored in one round trip: the text of BATCH_FUNCTION_SQL in
-- services/scheduler/intake.py, which documents it.
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

-- migrate:down
DROP FUNCTION followups_insert_requests(bigint[], bigint[], bigint[], timestamptz[], text[],
                                        text[], text[], boolean[], jsonb[], boolean[],
                                        boolean[], integer[], text[], smallint[], text[]);
