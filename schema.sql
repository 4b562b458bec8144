-- outbox-relay schema. The single source of truth for the relay's tables.
-- Idempotent: `outbox-relay migrate` applies it on every run, and applying it
-- twice changes nothing. Later versions only add (ADD COLUMN IF NOT EXISTS).

-- Serialise concurrent migrations (several sidecars starting at once).
SELECT pg_advisory_xact_lock(7305432718046262);

CREATE SCHEMA IF NOT EXISTS relay;

-- Tenants are optional: a tenant without a row gets weight 1 and no limit.
CREATE TABLE IF NOT EXISTS relay.tenants (
    id          text PRIMARY KEY,
    weight      integer NOT NULL DEFAULT 1 CHECK (weight > 0),  -- share of delivery slots under contention
    rate_limit  double precision,                               -- deliveries/s over all the tenant's endpoints; NULL or 0 = unlimited
    rate_burst  integer,                                        -- bucket size; NULL = max(1, rate_limit)
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS relay.endpoints (
    id           text PRIMARY KEY DEFAULT ('ep_' || replace(gen_random_uuid()::text, '-', '')),
    tenant_id    text NOT NULL,
    url          text NOT NULL,
    secrets      text[] NOT NULL DEFAULT '{}',   -- whsec_<base64>; every listed secret signs (rotation)
    event_types  text[],                         -- NULL or '{}' = every event type; 'invoice.*' matches a prefix
    enabled      boolean NOT NULL DEFAULT true,
    timeout_ms   integer NOT NULL DEFAULT 10000 CHECK (timeout_ms > 0),
    headers      jsonb,                          -- extra request headers, {"name": "value"}
    description  text,
    -- Optional per-endpoint overrides; NULL = the relay's defaults.
    retry_schedule   text[],       -- delay before each attempt, e.g. '{0s,10s,1m,1h}'
    max_attempts     integer CHECK (max_attempts > 0),  -- cuts or extends (repeating the last delay) the schedule
    rate_limit       double precision,  -- deliveries/s; NULL or 0 = unlimited
    rate_burst       integer,
    max_in_flight    integer CHECK (max_in_flight > 0),
    breaker_failures integer CHECK (breaker_failures > 0),  -- consecutive failures that open the circuit (default 5)
    breaker_cooldown_ms integer CHECK (breaker_cooldown_ms > 0), -- how long it stays open before one probe (default 30000)
    disabled_reason text,                        -- set by the relay when it disables an endpoint
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS endpoints_tenant_idx ON relay.endpoints (tenant_id);

-- Applications insert here, inside their own transactions. The relay reads
-- inserts from the WAL, never by polling; rows are kept for
-- --outbox-retention and then removed by the relay in small batches.
CREATE TABLE IF NOT EXISTS relay.outbox (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),  -- webhook-id is 'msg_' || replace(id::text, '-', '')
    tenant_id   text NOT NULL,
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,                              -- the request body, as payload::text
    endpoint_id text,                                        -- deliver to this endpoint only (NULL = every subscribed endpoint)
    headers     jsonb,                                       -- extra request headers for this event
    traceparent text,                                        -- W3C trace context, forwarded to the receiver
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON relay.outbox (created_at);

-- One row per (event, endpoint). States:
--   pending    recorded, waiting for its first attempt (spilled, or in flight at a restart)
--   retrying   an attempt failed; next_attempt_at says when the next one runs
--   succeeded  a 2xx answer (final)
--   failed     a non-retryable answer, e.g. 400 (final)
--   dead       attempts exhausted; see relay.dead_letters when it exists (final)
--   rejected   never attempted: unknown or disabled endpoint, bad URL or secret, payload too large (final)
--   unrouted   no enabled endpoint subscribes; endpoint_id is '' (final)
-- payload, headers and traceparent are kept while the row is not final, so
-- the relay can finish the delivery without the WAL or the outbox row, and
-- on failed, dead and rejected rows, so a dead letter can be replayed.
-- They are dropped (NULL) on succeeded and unrouted rows.
CREATE TABLE IF NOT EXISTS relay.deliveries (
    event_id         uuid NOT NULL,
    endpoint_id      text NOT NULL,
    tenant_id        text NOT NULL,
    event_type       text NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'retrying', 'succeeded', 'failed', 'dead', 'rejected', 'unrouted')),
    attempts         integer NOT NULL DEFAULT 0,
    http_status      integer,
    error            text,
    next_attempt_at  timestamptz,
    claimed_until    timestamptz,        -- a relay is attempting it; others leave it alone until then
    commit_lsn       pg_lsn,
    committed_at     timestamptz,
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    completed_at     timestamptz,
    duration_ms      double precision,   -- of the last attempt
    payload          jsonb,
    headers          jsonb,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS deliveries_due_idx ON relay.deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS deliveries_endpoint_state_idx ON relay.deliveries (endpoint_id, state);
CREATE INDEX IF NOT EXISTS deliveries_completed_idx ON relay.deliveries (completed_at)
    WHERE completed_at IS NOT NULL;

-- The relay's own bookkeeping, one row per replication slot.
-- recorded_lsn: every event whose commit ends after it has no deliveries row
-- yet, so after a restart only events at or below it need a lookup.
CREATE TABLE IF NOT EXISTS relay.relay_state (
    slot_name    text PRIMARY KEY,
    recorded_lsn pg_lsn NOT NULL DEFAULT '0/0',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per failed attempt (a success is described by its deliveries
-- row). attempt numbers start again at 1 after a replay. Kept for
-- --delivery-retention, then removed by the relay.
CREATE TABLE IF NOT EXISTS relay.attempts (
    event_id     uuid NOT NULL,
    endpoint_id  text NOT NULL,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    duration_ms  double precision,
    http_status  integer,
    error_class  text,      -- timeout, connection_refused, http_5xx, blocked, ...
    error        text
);
CREATE INDEX IF NOT EXISTS attempts_delivery_idx ON relay.attempts (event_id, endpoint_id);
CREATE INDEX IF NOT EXISTS attempts_attempted_at_idx ON relay.attempts (attempted_at);

-- Why an endpoint is quiet: its circuit breaker and failure streak, written
-- by the relay when they change. failing_since survives restarts, so an
-- endpoint failing for --auto-disable-after is disabled even across them.
CREATE TABLE IF NOT EXISTS relay.endpoint_health (
    endpoint_id   text PRIMARY KEY,
    breaker_state text NOT NULL DEFAULT 'closed' CHECK (breaker_state IN ('closed', 'open', 'half-open')),
    failing_since timestamptz,          -- first failure after the last success; NULL when healthy
    last_error    text,
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- Replays (see relay.dead_letters below) count here; a replayed delivery
-- keeps its event_id, and so its webhook-id.
ALTER TABLE relay.deliveries ADD COLUMN IF NOT EXISTS replay_count integer NOT NULL DEFAULT 0;
ALTER TABLE relay.deliveries ADD COLUMN IF NOT EXISTS replayed_at timestamptz;
