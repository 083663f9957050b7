-- migrate:up
-- set while a webhook call is under way; a cancel is refused only then
ALTER TABLE contractor_followup_schedules ADD COLUMN calling_since timestamptz;
-- occurrence number within a recurring series (1 for the first)
ALTER TABLE contractor_followup_schedules ADD COLUMN occurrence integer NOT NULL DEFAULT 1;

-- a 429 from the gateway pauses every dispatcher replica until this instant
CREATE TABLE gateway_pause (
    id           integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    paused_until timestamptz NOT NULL,
    reason       text
);

CREATE INDEX IF NOT EXISTS contractors_phone ON contractors (phone);
CREATE INDEX contractor_followup_schedules_sent_by_contractor
    ON contractor_followup_schedules (contractor_id, sent_at DESC) WHERE status = 'sent';

-- migrate:down
DROP INDEX contractor_followup_schedules_sent_by_contractor;
DROP TABLE gateway_pause;
ALTER TABLE contractor_followup_schedules DROP COLUMN occurrence;
ALTER TABLE contractor_followup_schedules DROP COLUMN calling_since;
