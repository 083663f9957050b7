-- migrate:up
-- A cancel by idempotency key that arrives before its request (the inbox is consumed
-- concurrently) is kept here; the request, when it comes, is recorded as cancelled.
CREATE TABLE cancelled_keys (
    idempotency_key text PRIMARY KEY,
    reason          text,
    cancelled_at    timestamptz NOT NULL DEFAULT now()
);

-- replies are matched on the digits of the stored phone, whatever its formatting
CREATE INDEX contractors_phone_digits ON contractors ((regexp_replace(phone, '[^0-9]', '', 'g')));

-- migrate:down
DROP INDEX contractors_phone_digits;
DROP TABLE cancelled_keys;
