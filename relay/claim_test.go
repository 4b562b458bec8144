package relay

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

// The loader reads only unclaimed due rows, writes nothing, and a pass
// from a cursor starts past the rows before it; a lapsed claim (a probe's
// or a lane's) is released by releaseExpired and the row then read. The
// plan reads deliveries_due_load_idx from the cursor on, without
// walking the rows before it (checked with EXPLAIN below).
func TestLoadReadsOnlyUnclaimedDueRowsPastItsCursor(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.Exec(`INSERT INTO relay.outbox (id, tenant_id, event_type, payload)
SELECT ('00000000-0000-0000-0000-00000000000' || i)::uuid, 't', 'claim', jsonb_build_object('i', i) FROM generate_series(1, 6) i`)
	// 1, 5, 6 due and unclaimed, 5 and 6 due at the same instant as 1;
	// 2 claimed until later; 3 claimed, lapsed; 4 not due yet.
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, next_attempt_at, claimed_until, committed_at)
SELECT id, 'ep', 't', 'claim', 'pending',
       CASE WHEN (payload->>'i')::int = 4 THEN now() + interval '1 hour' ELSE timestamptz '2026-01-01 00:00:00+00' END,
       CASE (payload->>'i')::int WHEN 2 THEN now() + interval '1 hour' WHEN 3 THEN now() - interval '1 second' END,
       now()
FROM relay.outbox`)
	load := func(n int, c loadCursor) ([]int, loadCursor) {
		ds, next, err := loadDue(ctx, e.Pool, n, nil, c)
		if err != nil {
			t.Fatal(err)
		}
		var got []int
		for _, d := range ds {
			got = append(got, int(d.eventID[15]))
			if string(d.payload) == "" {
				t.Errorf("loaded row %d has no payload (read from its outbox row)", d.eventID[15])
			}
			if !d.nextAttempt.IsZero() {
				t.Errorf("loaded row %d carries next_attempt_at into its outcome", d.eventID[15])
			}
		}
		return got, next
	}
	got, c := load(2, loadCursor{})
	if !slices.Equal(got, []int{1, 5}) {
		t.Fatalf("first pass got rows %v, want [1 5] (2 is claimed, 3's lapsed claim is not yet released, 4 is not due; 1, 5, 6 tie on due time, in key order)", got)
	}
	if got, c = load(10, c); !slices.Equal(got, []int{6}) {
		t.Fatalf("second pass, from the cursor, got rows %v, want [6]", got)
	}
	if got, _ = load(10, c); len(got) != 0 {
		t.Fatalf("third pass got rows %v, want none", got)
	}
	if got, _ = load(10, loadCursor{}); !slices.Equal(got, []int{1, 5, 6}) {
		t.Fatalf("a pass from the front got rows %v, want [1 5 6]: loading wrote nothing", got)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE claimed_until IS NOT NULL`); n != 2 {
		t.Fatalf("%d claimed rows after the loads, want 2 (rows 2 and 3, as inserted)", n)
	}
	n, err := releaseExpired(ctx, e.Pool)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("released %d lapsed claims, want 1 (row 3)", n)
	}
	if got, _ = load(10, loadCursor{}); !slices.Equal(got, []int{1, 3, 5, 6}) {
		t.Fatalf("a pass after the release got rows %v, want [1 3 5 6]", got)
	}

	// The plan reads the partial index of unclaimed rows from the
	// cursor's due time on: the rows due before it are not read at all.
	// (Six rows would be read by a sequential scan: the test asks for the
	// index, to see what is in it.)
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // read only
	if _, err := tx.Exec(ctx, `SET LOCAL enable_seqscan = off`); err != nil {
		t.Fatal(err)
	}
	e.Exec(`UPDATE relay.deliveries SET next_attempt_at = timestamptz '2025-01-01 00:00:00+00' WHERE event_id = '00000000-0000-0000-0000-000000000001'`)
	var plan []string
	rows, err := tx.Query(ctx, `EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) `+loadDueSQL, 10, []string{}, c.due, c.event, c.endpoint)
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
	// The cursor is the index's own order: it is an index condition, and
	// nothing is read and filtered out (row 1, due a year earlier, and
	// rows 3 and 5, before the cursor at the same instant, are not read).
	usesIndex := slices.ContainsFunc(plan, func(l string) bool { return strings.Contains(l, "deliveries_due_load_idx") })
	removed := slices.ContainsFunc(plan, func(l string) bool { return strings.Contains(l, "Rows Removed by Filter") })
	sorted := slices.ContainsFunc(plan, func(l string) bool { return strings.Contains(l, "Sort") })
	if !usesIndex || removed || sorted {
		t.Errorf("load plan does not start at the cursor in deliveries_due_load_idx:\n%s", strings.Join(plan, "\n"))
	}
}

// The held set: a loaded row is not loaded again until its next row is
// durable, and a row whose outcome was written while a load's query ran
// is not taken from that query's older snapshot.
func TestHeldRowsAreNotLoadedTwice(t *testing.T) {
	r := &Relay{}
	now := time.Unix(1000, 0)
	lease := time.Minute
	mk := func(i byte) *delivery { return &delivery{eventID: [16]byte{15: i}, endpointID: "ep"} }
	ids := func(ds []*delivery) (out []int) {
		for _, d := range ds {
			out = append(out, int(d.eventID[15]))
		}
		return out
	}
	r.beginLoad()
	first := r.holdLoaded([]*delivery{mk(1), mk(2)}, now, lease)
	if got := ids(first); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("first load kept %v, want [1 2]", got)
	}
	r.beginLoad()
	if got := ids(r.holdLoaded([]*delivery{mk(1), mk(3)}, now, lease)); !slices.Equal(got, []int{3}) {
		t.Fatalf("second load kept %v, want [3] (1 is held)", got)
	}
	if got := ids(r.dropHeld([]*delivery{mk(2), mk(4)}, now, lease)); !slices.Equal(got, []int{4}) {
		t.Fatalf("a probe's claim kept %v, want [4] (2 is held)", got)
	}
	// 1's outcome is written while the next load's query runs: that
	// query may return 1's older version; it must not be taken.
	r.beginLoad()
	r.unhold(first[0]) // what the writer's callback does
	if got := ids(r.holdLoaded([]*delivery{mk(1)}, now, lease)); len(got) != 0 {
		t.Fatalf("a row released during the query was taken from it: %v", got)
	}
	// The next query's snapshot sees the outcome: a row due again (a
	// retry) is loaded.
	r.beginLoad()
	if got := ids(r.holdLoaded([]*delivery{mk(1)}, now, lease)); !slices.Equal(got, []int{1}) {
		t.Fatalf("a released row due again was not loaded: %v", got)
	}
	// An entry past the lease counts no more (as a lapsed claim), and a
	// sweep forgets it.
	later := now.Add(lease)
	if got := ids(r.holdLoaded([]*delivery{mk(2)}, later, lease)); !slices.Equal(got, []int{2}) {
		t.Fatalf("a row held past the lease was not loaded again: %v", got)
	}
	if n := r.sweepHeld(later.Add(lease), lease); n != 3 || r.heldCount() != 0 {
		t.Fatalf("sweep forgot %d entries, %d left; want 3 and 0", n, r.heldCount())
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

// The loader's cursor moves past what it loaded; a row made due behind
// it (as a dead-letter replay does on a server whose clock lags the
// relay's) is still found, by a pass from the front within
// fromFrontTicks poll ticks.
func TestRowDueBehindTheCursorIsDelivered(t *testing.T) {
	t.Parallel()
	e, rcv := relayPastStartup(t)
	insert := func(id, due string) {
		// The outbox row's tenant has no endpoint: only the pending row
		// below brings it to "ep".
		e.Exec(`INSERT INTO relay.outbox (id, tenant_id, event_type, payload) VALUES ($1::uuid, 'nobody', 'behind', jsonb_build_object('id', $2::text))`, id, id)
		e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, next_attempt_at, committed_at)
VALUES ($1, 'ep', 't', 'behind', 'pending', now() + $2::interval, now())`, id, due)
	}
	insert("00000000-0000-0000-0000-0000000000b1", "0 seconds")
	e.WaitFor("the first row delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'behind' AND endpoint_id = 'ep' AND state = 'succeeded'`) == 1
	})
	insert("00000000-0000-0000-0000-0000000000b2", "-1 hour")
	e.WaitFor("the row due behind the cursor delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'behind' AND endpoint_id = 'ep' AND state = 'succeeded'`) == 2
	})
	seen := map[string]int{}
	for _, r := range rcv.requests() {
		seen[string(r.body)]++
	}
	for _, id := range []string{"00000000-0000-0000-0000-0000000000b1", "00000000-0000-0000-0000-0000000000b2"} {
		if n := seen[`{"id": "`+id+`"}`]; n != 1 {
			t.Errorf("row %s delivered %d times, want 1", id, n)
		}
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
	e.Exec(`DROP INDEX relay.deliveries_due_load_idx`)
	if got := missingIndexes(ctx, e.Pool); !slices.Equal(got, []string{"relay.deliveries_due_load_idx"}) {
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
