-- The gateway's record of each Idempotency-Key it has taken, in a PostgreSQL that n8n's
-- "Gateway PostgreSQL" credential reaches. Run once before activating the workflow:
--   psql "$GATEWAY_DATABASE_URL" -f deploy/n8n/schema.sql
-- No phone number or text is kept: only the key, what became of it, and Twilio's message SID.
CREATE TABLE IF NOT EXISTS followups_gateway_sends (
    idempotency_key text PRIMARY KEY,
    -- sending: claimed, at Twilio now; sent: Twilio took it; unknown: Twilio did not answer, the
    -- SMS may have gone, and the key is never sent again
    state text NOT NULL CHECK (state IN ('sending', 'sent', 'unknown')),
    message_sid text,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    settled_at timestamptz
);

CREATE INDEX IF NOT EXISTS followups_gateway_sends_claimed_at
    ON followups_gateway_sends (claimed_at);
