-- migrate:up
-- The claimant of an occurrence: set by each claim, checked by every later statement of the send,
-- so a dispatcher that lost its claim (taken over after its lease) can change nothing.
ALTER TABLE contractor_followup_schedules ADD COLUMN claim_id uuid;
-- A cancel or reschedule that arrives while a webhook call is under way is kept here and wins when
-- the call ends, unless the gateway accepted the call (then it is recorded as too late).
ALTER TABLE contractor_followup_schedules ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE contractor_followup_schedules ADD COLUMN cancel_reason text;
ALTER TABLE contractor_followup_schedules ADD COLUMN reschedule_to timestamptz;
-- Set while the follow-up waits for a place in the global send window; places go in the order
-- of this index.
ALTER TABLE contractor_followup_schedules ADD COLUMN waiting_since timestamptz;
CREATE INDEX contractor_followup_schedules_waiting
    ON contractor_followup_schedules (priority DESC, scheduled_time, id)
    WHERE waiting_since IS NOT NULL AND status IN ('scheduled', 'sending');

DROP FUNCTION followups_start_call(bigint, integer, integer, interval, bigint);
-- The text of FUNCTION_SQL in services/dispatcher/send_window.py, which documents it.
CREATE OR REPLACE FUNCTION followups_start_call(
    p_followup_id bigint, p_claim_id uuid, p_limit integer, p_window interval, p_lease interval,
    p_slack interval, p_lock_namespace integer, p_lock_key integer
) RETURNS TABLE (call_id bigint, frees_at timestamptz, lost boolean)
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
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_namespace, p_lock_key);
    v_now := clock_timestamp();
    SELECT * INTO v_row FROM contractor_followup_schedules AS f
    WHERE f.id = p_followup_id AND f.status = 'sending' AND f.claim_id = p_claim_id
      AND f.calling_since IS NULL
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::timestamptz, true;
        RETURN;
    END IF;
    SELECT g.paused_until INTO v_until FROM gateway_pause AS g WHERE g.paused_until > v_now;
    IF v_until IS NULL THEN
        -- the window's calls that still hold a place, oldest first
        SELECT coalesce(array_agg(last.called_at ORDER BY last.called_at), '{}') INTO v_recent
        FROM (SELECT w.called_at FROM webhook_calls AS w WHERE w.called_at > v_now - p_window
              ORDER BY w.called_at DESC LIMIT p_limit) AS last;
        v_free := p_limit - cardinality(v_recent);
        SELECT count(*),
               count(*) FILTER (WHERE f.next_attempt_at BETWEEN v_now - p_slack AND v_now + p_slack)
        INTO v_ahead, v_due_ahead
        FROM contractor_followup_schedules AS f
        WHERE f.waiting_since IS NOT NULL AND f.status IN ('scheduled', 'sending')
          AND (f.priority > v_row.priority
               OR (f.priority = v_row.priority
                   AND (f.scheduled_time, f.id) < (v_row.scheduled_time, v_row.id)));
        IF v_free > v_due_ahead THEN
            UPDATE contractor_followup_schedules AS f
            SET calling_since = v_now, lease_until = v_now + p_lease, waiting_since = NULL,
                webhook_started_at = coalesce(f.webhook_started_at, v_now),
                lateness_ms = coalesce(f.lateness_ms,
                                       extract(epoch FROM v_now - f.scheduled_time) * 1000)
            WHERE f.id = p_followup_id;
            RETURN QUERY
                INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
                VALUES (p_followup_id, v_row.send_key, v_row.attempts, v_now)
                RETURNING webhook_calls.id, NULL::timestamptz, false;
            RETURN;
        END IF;
        -- the v_ahead-th place to come (0 is the next): places repeat every window
        v_turn := v_ahead % p_limit;
        IF v_turn < v_free THEN
            v_until := v_now;
        ELSE
            v_until := v_recent[v_turn - v_free + 1] + p_window;
        END IF;
        v_until := v_until + p_window * (v_ahead / p_limit);
    END IF;
    UPDATE contractor_followup_schedules AS f
    SET waiting_since = coalesce(f.waiting_since, v_now), next_attempt_at = v_until
    WHERE f.id = p_followup_id;
    RETURN QUERY SELECT NULL::bigint, v_until, false;
END;
$$;

-- migrate:down
DROP FUNCTION followups_start_call(bigint, uuid, integer, interval, interval, interval, integer, integer);
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

DROP INDEX contractor_followup_schedules_waiting;
ALTER TABLE contractor_followup_schedules DROP COLUMN waiting_since;
ALTER TABLE contractor_followup_schedules DROP COLUMN reschedule_to;
ALTER TABLE contractor_followup_schedules DROP COLUMN cancel_reason;
ALTER TABLE contractor_followup_schedules DROP COLUMN cancel_requested_at;
ALTER TABLE contractor_followup_schedules DROP COLUMN claim_id;
