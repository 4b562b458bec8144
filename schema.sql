-- outbox-relay schema. The single source of truth for the relay's tables.
-- Idempotent: `outbox-relay migrate` applies it on every run, and applying it
-- twice changes nothing. Later versions add (ADD COLUMN IF NOT EXISTS, CREATE
-- ... IF NOT EXISTS, CREATE OR REPLACE) and drop what they replaced (DROP
-- INDEX IF EXISTS).

-- Serialise concurrent migrations (several sidecars starting at once).
SELECT pg_advisory_xact_lock(7305432718046262);

CREATE SCHEMA IF NOT EXISTS relay;

-- Tenants are optional: a tenant without a row gets weight 1 and no limit.
CREATE TABLE IF NOT EXISTS relay.tenants (
    id          text PRIMARY KEY,
    weight      integer NOT NULL DEFAULT 1 CHECK (weight > 0),  -- share of delivery slots under contention
    rate_limit  double precision,                               -- deliveries/s over all the tenant's endpoints; NULL or 0 = unlimited
    rate_burst  integer,                                        -- bucket size; NULL or 0 = max(1, ceil(rate_limit))
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
    rate_burst       integer,           -- bucket size; NULL or 0 = max(1, ceil(rate_limit))
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
--   failed     a non-retryable answer, e.g. 400, or a blocked address (final)
--   dead       attempts exhausted, or the relay disabled the endpoint; see relay.dead_letters when it exists (final)
--   rejected   never attempted: unknown or disabled endpoint, bad URL or secret, payload too large (final)
--   unrouted   no enabled endpoint subscribes; endpoint_id is '' (final)
-- payload, headers and traceparent are kept on retrying rows, so the relay
-- can finish the delivery without the WAL or the outbox row, and on failed,
-- dead and rejected rows, so a dead letter can be replayed. A pending row
-- that a full queue spilled straight from the WAL has them NULL: its outbox
-- row holds them, and the relay's cleanup keeps that row until the delivery
-- is done. They are dropped (NULL) on succeeded and unrouted rows.
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
-- Due rows no relay holds, in due order: the loader's claim reads the
-- front of this index. A claimed row (in a relay's memory) leaves it, so a
-- claim never walks past the thousands of rows a busy endpoint has loaded.
-- An expired claim is found in the second index and released (set NULL).
CREATE INDEX IF NOT EXISTS deliveries_due_unclaimed_idx ON relay.deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying') AND claimed_until IS NULL;
CREATE INDEX IF NOT EXISTS deliveries_claimed_idx ON relay.deliveries (claimed_until)
    WHERE state IN ('pending', 'retrying') AND claimed_until IS NOT NULL;
-- Replaced by the two above (schema versions before 2026-12): it held
-- claimed rows too, and every claim walked past them.
DROP INDEX IF EXISTS relay.deliveries_due_idx;
-- Most rows end succeeded (or unrouted) and are only ever read again by
-- the retention cleanup, so the indexes skip them: a row a second costs
-- Postgres a heap insert, the primary key and two BRIN page summaries.
-- Per-endpoint questions (what is stuck, what is dead) and the dead-letter
-- list use small partial indexes; the cleanup of old succeeded rows walks
-- completed_at by page range.
CREATE INDEX IF NOT EXISTS deliveries_open_endpoint_idx ON relay.deliveries (endpoint_id, state)
    WHERE state NOT IN ('succeeded', 'unrouted');
CREATE INDEX IF NOT EXISTS deliveries_dead_letters_idx ON relay.deliveries (completed_at)
    WHERE state IN ('dead', 'failed', 'rejected');
CREATE INDEX IF NOT EXISTS deliveries_completed_brin ON relay.deliveries USING brin (completed_at);
-- Replaced by the three above (schema versions before 2026-12): every row
-- paid two B-tree inserts for them.
DROP INDEX IF EXISTS relay.deliveries_endpoint_state_idx;
DROP INDEX IF EXISTS relay.deliveries_completed_idx;

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

-- Dead letters and replay (dlq/)
--
-- relay.dead_letters lists the deliveries that will not be attempted again
-- unless someone replays them: dead (attempts exhausted, or the relay
-- disabled the endpoint), failed (a final answer such as 400, or 410 Gone,
-- which also disabled the endpoint, or an address the SSRF guard blocks) and
-- rejected (never attempted: disabled or unknown endpoint, bad URL or
-- secret, payload too large). reason is the row's error; for a non-2xx
-- answer it ends with ": " and the first 256 bytes of the response body
-- (whitespace trimmed; left out when the body is binary). replayable is
-- false only for rows written before dead letters kept their payload.
-- Columns are only ever added at the end (CREATE OR REPLACE VIEW cannot
-- drop or reorder them).
CREATE OR REPLACE VIEW relay.dead_letters AS
SELECT d.event_id,
       'msg_' || replace(d.event_id::text, '-', '') AS webhook_id,
       d.endpoint_id,
       d.tenant_id,
       d.event_type,
       d.state,
       d.error AS reason,
       d.attempts,
       d.http_status AS last_http_status,
       d.created_at,
       d.first_attempt_at,
       d.last_attempt_at,
       d.completed_at,
       d.replay_count,
       d.replayed_at,
       d.payload IS NOT NULL AS replayable,
       d.payload,
       d.headers,
       d.traceparent
FROM relay.deliveries d
WHERE d.state IN ('dead', 'failed', 'rejected');

-- Replay puts a dead letter back in the relay's hands: the row becomes
-- pending and due now, with a fresh attempt budget (attempts = 0), and the
-- running relay claims and delivers it within its poll interval, with the
-- same webhook-id (it derives from event_id). replay_count and replayed_at
-- record the replay; the last failure's error and status are cleared (the
-- failed attempts stay in relay.attempts). Only rows that are dead letters
-- at the moment of the UPDATE change: a second replay of the same entry
-- waits for the first one's row lock, then finds the row pending and does
-- nothing, so concurrent replays deliver once. A replayed row whose
-- endpoint is still disabled ends again without an attempt: dead, with the
-- endpoint's disabled_reason, when that is set (the relay disabled it), and
-- rejected otherwise. Re-enable the endpoint first.
--
--   SELECT relay.replay_dead_letter('0190a5d2-...'::uuid, 'ep_billing');  -- true if replayed
CREATE OR REPLACE FUNCTION relay.replay_dead_letter(event_id uuid, endpoint_id text)
RETURNS boolean
LANGUAGE sql VOLATILE AS $$
WITH replayed AS (
    UPDATE relay.deliveries d
    SET state = 'pending', attempts = 0, next_attempt_at = now(), claimed_until = NULL,
        completed_at = NULL, http_status = NULL, error = NULL,
        replay_count = d.replay_count + 1, replayed_at = now(), updated_at = now()
    WHERE d.event_id = replay_dead_letter.event_id
      AND d.endpoint_id = replay_dead_letter.endpoint_id
      AND d.state IN ('dead', 'failed', 'rejected')
      AND d.payload IS NOT NULL
    RETURNING 1)
SELECT EXISTS (SELECT FROM replayed)
$$;

-- Replays every dead letter that matches all the given filters (NULL = no
-- filter) and returns how many it replayed. The time window is on
-- completed_at: since <= completed_at < until.
--
-- One call is one transaction that locks every row it replays until it
-- commits. For a large queue pass max_rows (say 1000) and call it again
-- until it returns less than max_rows, each call in its own transaction,
-- with replayed_before set to the time of the first call, so a row that
-- was replayed and failed again during the run is not replayed twice:
--
--   SELECT relay.replay_dead_letters(endpoint_id => 'ep_billing');
--   SELECT relay.replay_dead_letters(tenant_id => 'acme', since => now() - interval '1 day',
--                                    max_rows => 1000, replayed_before => '2026-01-02 03:04:05Z');
--
-- `outbox-relay dlq replay --all` and dlq.ReplayAll do exactly that.
CREATE OR REPLACE FUNCTION relay.replay_dead_letters(
    endpoint_id     text DEFAULT NULL,
    tenant_id       text DEFAULT NULL,
    since           timestamptz DEFAULT NULL,
    until           timestamptz DEFAULT NULL,
    max_rows        integer DEFAULT NULL,      -- NULL = every matching row
    replayed_before timestamptz DEFAULT NULL)  -- skip rows replayed at or after this time
RETURNS integer
LANGUAGE sql VOLATILE AS $$
WITH picked AS (
    SELECT d.event_id, d.endpoint_id
    FROM relay.deliveries d
    WHERE d.state IN ('dead', 'failed', 'rejected')
      AND d.payload IS NOT NULL
      AND (replay_dead_letters.endpoint_id IS NULL OR d.endpoint_id = replay_dead_letters.endpoint_id)
      AND (replay_dead_letters.tenant_id IS NULL OR d.tenant_id = replay_dead_letters.tenant_id)
      AND (replay_dead_letters.since IS NULL OR d.completed_at >= replay_dead_letters.since)
      AND (replay_dead_letters.until IS NULL OR d.completed_at < replay_dead_letters.until)
      AND (replay_dead_letters.replayed_before IS NULL OR d.replayed_at IS NULL
           OR d.replayed_at < replay_dead_letters.replayed_before)
    ORDER BY d.completed_at, d.event_id, d.endpoint_id
    LIMIT replay_dead_letters.max_rows
    FOR UPDATE),
replayed AS (
    UPDATE relay.deliveries d
    SET state = 'pending', attempts = 0, next_attempt_at = now(), claimed_until = NULL,
        completed_at = NULL, http_status = NULL, error = NULL,
        replay_count = d.replay_count + 1, replayed_at = now(), updated_at = now()
    FROM picked
    WHERE d.event_id = picked.event_id AND d.endpoint_id = picked.endpoint_id
      AND d.state IN ('dead', 'failed', 'rejected')
    RETURNING 1)
SELECT count(*)::integer FROM replayed
$$;

-- Ordered (FIFO) endpoints. With ordered = true, the endpoint's deliveries
-- are attempted one at a time in commit order (commit_lsn, then event_seq,
-- the outbox row's position within its transaction): the next one starts
-- only once the one before has a final state. The relay keeps such an
-- endpoint's unfinished deliveries as pending rows and loads them back in
-- that order (deliveries_ordered_idx), so a head that retries for hours
-- holds neither memory nor the WAL. See "Ordered endpoints" in the README.
ALTER TABLE relay.endpoints ADD COLUMN IF NOT EXISTS ordered boolean NOT NULL DEFAULT false;
ALTER TABLE relay.deliveries ADD COLUMN IF NOT EXISTS event_seq integer;  -- position of the outbox row within its transaction (0-based)
CREATE INDEX IF NOT EXISTS deliveries_ordered_idx ON relay.deliveries (endpoint_id, commit_lsn, event_seq)
    WHERE state IN ('pending', 'retrying');

-- Endpoint config as of each commit position, written by the relay as the
-- changes stream past it (before it acknowledges them). After a restart the
-- relay starts from the slot's confirmed position and replays what came
-- after: it routes those events with the config as of that position, built
-- from this table, not with the config as it is now. config is the
-- endpoint's columns as text ({"column": "text or null"}), NULL once
-- deleted; op is
-- 'snapshot' (its state when the relay first saw it, not from the stream),
-- 'insert', 'update' or 'delete'. The relay prunes versions no replication
-- slot of this database can return to, so this holds about one row per
-- endpoint (a copy of its row, secrets included) plus recent changes.
CREATE TABLE IF NOT EXISTS relay.endpoint_history (
    endpoint_id text NOT NULL,
    commit_lsn  pg_lsn NOT NULL,
    op          text NOT NULL CHECK (op IN ('snapshot', 'insert', 'update', 'delete')),
    config      jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, commit_lsn)
);
