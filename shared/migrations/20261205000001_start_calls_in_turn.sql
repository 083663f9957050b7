-- migrate:up
-- The calls that start together take their places in one transaction: the text of
-- BATCH_FUNCTION_SQL in services/dispatcher/send_window.py, which documents it.
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
