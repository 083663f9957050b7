-- migrate:up
CREATE TABLE IF NOT EXISTS contractors (
    id            bigserial PRIMARY KEY,
    first_name    text,
    last_name     text,
    company_name  text,
    phone         text,
    timezone      text,
    sms_opt_out   boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS contractor_action_items (
    id             bigserial PRIMARY KEY,
    contractor_id  bigint NOT NULL REFERENCES contractors (id),
    title          text NOT NULL,
    description    text,
    due_date       date,
    status         text NOT NULL DEFAULT 'open',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS contractor_action_items_contractor ON contractor_action_items (contractor_id);

CREATE TABLE IF NOT EXISTS events (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    event_date  timestamptz,
    location    text
);

CREATE TABLE contractor_followup_schedules (
    -- the 21 columns of the original design
    id                        bigserial PRIMARY KEY,
    contractor_id             bigint NOT NULL REFERENCES contractors (id),
    action_item_id            bigint REFERENCES contractor_action_items (id),
    event_id                  bigint REFERENCES events (id),
    scheduled_time            timestamptz NOT NULL,
    followup_type             text NOT NULL,
    message_template          text NOT NULL,
    message_tone              text NOT NULL DEFAULT 'friendly',
    status                    text NOT NULL DEFAULT 'scheduled'
        CHECK (status IN ('scheduled', 'sending', 'sent', 'cancelled', 'skipped', 'failed')),
    sent_at                   timestamptz,
    sent_by                   text,
    response_received_at      timestamptz,
    response_text             text,
    ai_should_personalize     boolean NOT NULL DEFAULT false,
    ai_context_hints          jsonb NOT NULL DEFAULT '{}'::jsonb,
    skip_if_completed         boolean NOT NULL DEFAULT false,
    is_recurring              boolean NOT NULL DEFAULT false,
    recurrence_interval_days  integer CHECK (recurrence_interval_days >= 1),
    next_occurrence_id        bigint REFERENCES contractor_followup_schedules (id),
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- what the pipeline needs beyond them
    idempotency_key           text NOT NULL UNIQUE,
    send_key                  uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    version                   integer NOT NULL DEFAULT 1,
    priority                  smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    requested_by              text,
    series_id                 bigint,
    status_reason             text,
    prepared_text             text,
    prepared_version          integer,
    prepared_at               timestamptz,
    text_source               text CHECK (text_source IN ('ai', 'template')),
    text_fallback_reason      text,
    ai_model                  text,
    prompt_variant            text,
    attempts                  integer NOT NULL DEFAULT 0,
    next_attempt_at           timestamptz,
    last_error                text,
    claimed_at                timestamptz,
    lease_until               timestamptz,
    webhook_started_at        timestamptz,
    lateness_ms               double precision,
    deferred_until            timestamptz,
    deferred_reason           text
);
-- due work in time order: the repair sweep, `followups list --due`, stats
CREATE INDEX contractor_followup_schedules_pending
    ON contractor_followup_schedules (scheduled_time)
    WHERE status IN ('scheduled', 'sending');
CREATE INDEX contractor_followup_schedules_contractor
    ON contractor_followup_schedules (contractor_id, scheduled_time DESC);
CREATE INDEX contractor_followup_schedules_status_type
    ON contractor_followup_schedules (status, followup_type);
CREATE INDEX contractor_followup_schedules_series
    ON contractor_followup_schedules (series_id) WHERE series_id IS NOT NULL;

-- every transition of a follow-up, for `followups show` and audits
CREATE TABLE followup_transitions (
    id           bigserial PRIMARY KEY,
    followup_id  bigint NOT NULL REFERENCES contractor_followup_schedules (id),
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    stage        text NOT NULL,
    from_status  text,
    to_status    text,
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX followup_transitions_followup ON followup_transitions (followup_id, at);

-- every webhook call, across all dispatcher replicas: the global rate limit and the audit trail
CREATE TABLE webhook_calls (
    id           bigserial PRIMARY KEY,
    followup_id  bigint NOT NULL REFERENCES contractor_followup_schedules (id),
    send_key     uuid NOT NULL,
    attempt      integer NOT NULL,
    called_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    outcome      text,
    http_status  integer
);
CREATE INDEX webhook_calls_called_at ON webhook_calls (called_at);
CREATE INDEX webhook_calls_followup ON webhook_calls (followup_id);

-- migrate:down
DROP TABLE webhook_calls;
DROP TABLE followup_transitions;
DROP TABLE contractor_followup_schedules;
DROP TABLE events;
DROP TABLE contractor_action_items;
DROP TABLE contractors;
