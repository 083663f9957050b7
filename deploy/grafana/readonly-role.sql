-- The role the effectiveness dashboard (deploy/grafana/effectiveness.json) reads the database as:
-- SELECT on the columns its queries use (shared/effectiveness.py) and nothing else; no phone,
-- name, template or prepared text. It reads the reply text, as opt-outs are told by the reply.
-- Grafana runs whatever SQL a dashboard editor types, so these grants are the only fence.
--
-- Apply it as the owner of the tables, once per database, after `followups migrate`:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/grafana/readonly-role.sql
-- The role is made without a password, so it can't log in until one is set:
--   psql "$DATABASE_URL" -c "\password followups_dashboard"
-- Applying it again is harmless; it also narrows the grants back to this list.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'followups_dashboard') THEN
        CREATE ROLE followups_dashboard LOGIN NOINHERIT;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO followups_dashboard', current_database());
END
$$;

-- Sessions start read-only too (a second fence, not a substitute for the grants).
ALTER ROLE followups_dashboard SET default_transaction_read_only = on;

GRANT USAGE ON SCHEMA public TO followups_dashboard;

REVOKE ALL ON contractor_followup_schedules, contractors, send_rate_changes
    FROM followups_dashboard;
GRANT SELECT (
    id, contractor_id, followup_type, message_tone, status, sent_at, response_received_at,
    response_text, prompt_variant, text_source, delivery_status, delivery_error_code
) ON contractor_followup_schedules TO followups_dashboard;
GRANT SELECT (id, timezone) ON contractors TO followups_dashboard;
GRANT SELECT (id, at, limit_per_minute, previous_limit) ON send_rate_changes
    TO followups_dashboard;
