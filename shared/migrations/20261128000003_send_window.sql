-- migrate:up
-- One round trip to start a webhook call: the global send window, the fleet-wide pause and the
-- "still ours, not cancelled" check, all under one advisory lock held only for this statement.
-- Returns (call_id, frees_at, cancelled): a call id when the call may start now; otherwise when
-- to try again, or cancelled = true when the row moved on (cancelled or rescheduled).
CREATE FUNCTION followups_start_call(
    p_followup_id bigint, p_version integer, p_limit integer, p_window interval, p_lock bigint
) RETURNS TABLE (call_id bigint, frees_at timestamptz, cancelled boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_until timestamptz;
    v_send_key uuid;
    v_attempt integer;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    v_now := clock_timestamp();
    SELECT paused_until INTO v_until FROM gateway_pause WHERE paused_until > v_now;
    IF v_until IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, v_until, false;
        RETURN;
    END IF;
    SELECT w.called_at + p_window INTO v_until FROM webhook_calls AS w
    WHERE w.called_at > v_now - p_window
    ORDER BY w.called_at DESC OFFSET p_limit - 1 LIMIT 1;
    IF v_until IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, v_until, false;
        RETURN;
    END IF;
    UPDATE contractor_followup_schedules AS f
    SET calling_since = v_now,
        webhook_started_at = coalesce(f.webhook_started_at, v_now),
        lateness_ms = coalesce(f.lateness_ms, extract(epoch FROM v_now - f.scheduled_time) * 1000)
    WHERE f.id = p_followup_id AND f.status = 'sending' AND f.version = p_version
      AND f.calling_since IS NULL
    RETURNING f.send_key, f.attempts INTO v_send_key, v_attempt;
    IF v_send_key IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, NULL::timestamptz, true;
        RETURN;
    END IF;
    RETURN QUERY
        INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
        VALUES (p_followup_id, v_send_key, v_attempt, v_now)
        RETURNING webhook_calls.id, NULL::timestamptz, false;
END;
$$;

-- migrate:down
DROP FUNCTION followups_start_call(bigint, integer, integer, interval, bigint);
