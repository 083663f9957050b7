-- migrate:up
-- What the SMS provider reported on an occurrence (followup.delivery_reported); the report with the
-- latest reported_at wins.
ALTER TABLE contractor_followup_schedules
    ADD COLUMN delivery_status text
        CHECK (delivery_status IN ('delivered', 'undelivered', 'failed')),
    ADD COLUMN delivery_error_code text,
    ADD COLUMN delivery_reported_at timestamptz;

-- A permanent delivery failure (unknown number, landline, ...) for the phone stored here: nothing
-- is sent to the contractor while `phone` still has the same digits.
ALTER TABLE contractors
    ADD COLUMN undeliverable_phone text,
    ADD COLUMN undeliverable_code text,
    ADD COLUMN undeliverable_at timestamptz;

-- The adaptive send rate, shared by every dispatcher replica; written only under the send
-- window's advisory lock. No row: the configured ceiling.
CREATE TABLE send_rate (
    id                  integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    limit_per_minute    integer NOT NULL CHECK (limit_per_minute >= 1),
    delivered_in_a_row  integer NOT NULL DEFAULT 0,
    throttled_at        timestamptz,
    raised_at           timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every change of the adaptive rate, for `followups stats` and dashboards.
CREATE TABLE send_rate_changes (
    id                bigserial PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    limit_per_minute  integer NOT NULL,
    previous_limit    integer NOT NULL,
    cause             text NOT NULL,
    followup_id       bigint
);
CREATE INDEX send_rate_changes_at ON send_rate_changes (at);

DROP FUNCTION followups_start_call(bigint, uuid, integer, interval, interval, interval, integer, integer);
-- The text of FUNCTION_SQL in services/dispatcher/send_window.py, which documents it.
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
        -- the window's calls that still hold a place, oldest first
        SELECT coalesce(array_agg(last.called_at ORDER BY last.called_at), '{}') INTO v_recent
        FROM (SELECT w.called_at FROM webhook_calls AS w WHERE w.called_at > v_now - p_window
              ORDER BY w.called_at DESC LIMIT v_limit) AS last;
        v_free := v_limit - cardinality(v_recent);
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

-- migrate:down
DROP FUNCTION followups_start_call(bigint, uuid, integer, interval, interval, interval, integer, integer);
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

DROP TABLE send_rate_changes;
DROP TABLE send_rate;
ALTER TABLE contractors
    DROP COLUMN undeliverable_at,
    DROP COLUMN undeliverable_code,
    DROP COLUMN undeliverable_phone;
ALTER TABLE contractor_followup_schedules
    DROP COLUMN delivery_reported_at,
    DROP COLUMN delivery_error_code,
    DROP COLUMN delivery_status;
