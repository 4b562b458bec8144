package relay

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

// The loader claims only unclaimed due rows; a lapsed claim is released
// (and the row then claimed) by releaseExpired, a live one is left alone.
// Claimed rows leave deliveries_due_unclaimed_idx, so the claim's plan
// never walks past them (checked with EXPLAIN below).
func TestClaimReadsOnlyUnclaimedDueRows(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.Exec(`INSERT INTO relay.outbox (id, tenant_id, event_type, payload)
SELECT ('00000000-0000-0000-0000-00000000000' || i)::uuid, 't', 'claim', jsonb_build_object('i', i) FROM generate_series(1, 4) i`)
	// 1 due and unclaimed; 2 claimed until later; 3 claimed, lapsed; 4 not due yet.
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, next_attempt_at, claimed_until, committed_at)
SELECT id, 'ep', 't', 'claim', 'pending',
       CASE WHEN (payload->>'i')::int = 4 THEN now() + interval '1 hour' ELSE now() - interval '1 second' END,
       CASE (payload->>'i')::int WHEN 2 THEN now() + interval '1 hour' WHEN 3 THEN now() - interval '1 second' END,
       now()
FROM relay.outbox`)
	claimed := func() []int {
		ds, err := claimDue(ctx, e.Pool, 10, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		var got []int
		for _, d := range ds {
			got = append(got, int(d.eventID[15]))
			if string(d.payload) == "" {
				t.Errorf("claimed row %d has no payload (read from its outbox row)", d.eventID[15])
			}
		}
		slices.Sort(got)
		return got
	}
	if got := claimed(); !slices.Equal(got, []int{1}) {
		t.Fatalf("first claim got rows %v, want [1] (2 is claimed, 3's lapsed claim is not yet released, 4 is not due)", got)
	}
	if got := claimed(); len(got) != 0 {
		t.Fatalf("second claim got rows %v, want none (1 is now claimed)", got)
	}
	n, err := releaseExpired(ctx, e.Pool)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("released %d lapsed claims, want 1 (row 3)", n)
	}
	if got := claimed(); !slices.Equal(got, []int{3}) {
		t.Fatalf("claim after the release got rows %v, want [3]", got)
	}

	// The plan reads the partial index of unclaimed rows, and filters
	// nothing out of it: claimed rows are not in it.
	// (Four rows would be read by a sequential scan: the test asks for the
	// index, to see what is in it.)
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // read only
	if _, err := tx.Exec(ctx, `SET LOCAL enable_seqscan = off`); err != nil {
		t.Fatal(err)
	}
	var plan []string
	rows, err := tx.Query(ctx, `EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) SELECT event_id FROM relay.deliveries
WHERE state IN ('pending', 'retrying') AND claimed_until IS NULL AND next_attempt_at <= now()
ORDER BY next_attempt_at LIMIT 10 FOR UPDATE SKIP LOCKED`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		plan = append(plan, line)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	usesIndex := slices.ContainsFunc(plan, func(l string) bool { return strings.Contains(l, "deliveries_due_unclaimed_idx") })
	removed := slices.ContainsFunc(plan, func(l string) bool { return strings.Contains(l, "Rows Removed by Filter") })
	if !usesIndex || removed {
		t.Errorf("claim plan does not read only unclaimed rows from deliveries_due_unclaimed_idx:\n%v", plan)
	}
}

// A row whose claim lapsed while the relay runs is released by the
// loader's tick and delivered.
func TestLapsedClaimIsDelivered(t *testing.T) {
	t.Parallel()
	// Once an event has gone through, the relay is past its startup, which
	// voids every claim: what releases the row below is the loader's tick.
	e, rcv := relayPastStartup(t)
	e.Exec(`INSERT INTO relay.outbox (id, tenant_id, event_type, payload) VALUES ('00000000-0000-0000-0000-0000000000aa', 'nobody', 'lapsed', '{"lapsed": true}')`)
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, next_attempt_at, claimed_until, committed_at)
VALUES ('00000000-0000-0000-0000-0000000000aa', 'ep', 't', 'lapsed', 'pending', now(), now() - interval '1 second', now())`)
	e.WaitFor("the lapsed row delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'lapsed' AND state = 'succeeded' AND claimed_until IS NULL`) == 1
	})
	var n int
	for _, r := range rcv.requests() {
		if string(r.body) == `{"lapsed": true}` {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("receiver got the lapsed row's payload %d times, want 1", n)
	}
}

// A database migrated by an older version lacks the claim indexes: the
// relay names them (and warns at startup) instead of failing.
func TestMissingIndexesAreNamed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	if got := missingIndexes(ctx, e.Pool); len(got) != 0 {
		t.Fatalf("fresh schema: missing %v", got)
	}
	e.Exec(`DROP INDEX relay.deliveries_due_unclaimed_idx`)
	if got := missingIndexes(ctx, e.Pool); !slices.Equal(got, []string{"relay.deliveries_due_unclaimed_idx"}) {
		t.Fatalf("after dropping the unclaimed index: missing %v", got)
	}
}

// The relay's connections say who they are: application_name outbox-relay
// on its pool's backends and on its walsender.
func TestConnectionsNameTheRelay(t *testing.T) {
	t.Parallel()
	e, _ := relayPastStartup(t)
	for _, kind := range []string{"client backend", "walsender"} {
		if n := e.Count(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = $1 AND application_name = $2`,
			kind, ApplicationName); n < 1 {
			t.Errorf("no %s with application_name %q", kind, ApplicationName)
		}
	}
}

// relayPastStartup starts a relay with one endpoint, "ep" of tenant "t",
// and returns once a first event has been delivered through it.
func relayPastStartup(t *testing.T) (*env, *receiver) {
	t.Helper()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'warm', '{}')`)
	e.WaitFor("the first event delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'warm' AND state = 'succeeded'`) == 1
	})
	return e, rcv
}
