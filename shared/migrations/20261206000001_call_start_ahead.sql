-- migrate:up
-- A call's start may be taken ahead of its scheduled time: the send window is judged, and the call
-- recorded, at the call's instant. The text of FUNCTION_SQL in services/dispatcher/send_window.py,
-- which documents it.
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

-- migrate:down
CREATE OR REPLACE FUNCTION followups_start_call(
    p_followup_id bigint, p_claim_id uuid, p_limit integer, p_window interval, p_lease interval,
    p_slack interval, p_lock_namespace integer, p_lock_key integer
) RETURNS TABLE (call_id bigint, frees_at timestamptz, lost boolean, current_limit integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
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
    SELECT g.paused_until INTO v_until FROM gateway_pause AS g WHERE g.paused_until > v_now;
    IF v_until IS NULL THEN
        -- the calls in the window: whole seconds from their counts, the second the window
        -- starts in from the calls themselves
        v_edge := floor(extract(epoch FROM v_now - p_window))::bigint;
        SELECT coalesce(sum(s.calls), 0) INTO v_calls
        FROM webhook_call_seconds AS s WHERE s.epoch_second > v_edge;
        v_calls := v_calls + (SELECT count(*) FROM webhook_calls AS w
                              WHERE w.called_at > v_now - p_window
                                AND w.called_at < to_timestamp(v_edge + 1));
        v_free := v_limit - least(v_calls, v_limit);
        SELECT count(*),
               count(*) FILTER (WHERE f.next_attempt_at BETWEEN v_now - p_slack AND v_now + p_slack)
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
            FROM (SELECT w.called_at FROM webhook_calls AS w WHERE w.called_at > v_now - p_window
                  ORDER BY w.called_at DESC LIMIT v_limit) AS last;
            v_free := v_limit - cardinality(v_recent);
        END IF;
        IF v_free > v_due_ahead THEN
            DELETE FROM webhook_call_seconds AS s WHERE s.epoch_second < v_edge;
            UPDATE contractor_followup_schedules AS f
            SET calling_since = v_now, lease_until = v_now + p_lease, waiting_since = NULL,
                webhook_started_at = coalesce(f.webhook_started_at, v_now),
                lateness_ms = coalesce(f.lateness_ms,
                                       extract(epoch FROM v_now - f.scheduled_time) * 1000)
            WHERE f.id = p_followup_id;
            RETURN QUERY
                INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
                VALUES (p_followup_id, v_row.send_key, v_row.attempts, v_now)
                RETURNING webhook_calls.id, NULL::timestamptz, false, v_limit;
            RETURN;
        END IF;
        -- the v_ahead-th place to come (0 is the next): places repeat every window
        v_turn := v_ahead % v_limit;
        IF v_turn < v_free THEN
            v_until := v_now;
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
