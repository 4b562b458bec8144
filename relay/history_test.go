package relay

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
	"unicode/utf8"
)

// A relay that starts behind (its slot's confirmed position before events
// and endpoint changes committed while it was down) routes each replayed
// event with the endpoint config committed before it, not with the config
// as it is at the restart: enabled, disabled and deleted endpoints alike.
func TestReplayRoutesWithTheConfigOfItsCommit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcvA, rcvB, rcvC := newReceiver(t), newReceiver(t), newReceiver(t)
	e.addEndpoint("ep_a", "t", rcvA, "a")
	e.addEndpoint("ep_b", "t", rcvB, "b")
	e.addEndpoint("ep_c", "t", rcvC, "c")
	_, stop := e.startRelay(nil)
	publish := func(typ, n string) {
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', $1, jsonb_build_object('n', $2::text))`, typ, n)
	}
	// While the first relay runs, ep_b is disabled; the relay records that
	// version and acknowledges past it.
	e.Exec(`UPDATE relay.endpoints SET enabled = false WHERE id = 'ep_b'`)
	publish("a", "marker")
	e.WaitFor("the marker delivered and acknowledged", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id, pg_replication_slots s
WHERE o.payload->>'n' = 'marker' AND d.state = 'succeeded' AND s.slot_name = $1 AND s.confirmed_flush_lsn > d.commit_lsn`, e.Slot) == 1
	})
	stop()

	// With no relay running: events, then changes, then events.
	publish("a", "a1") // ep_a enabled: for it
	publish("b", "b1") // ep_b disabled: not for it
	publish("c", "c1") // ep_c exists: for it
	e.Exec(`UPDATE relay.endpoints SET enabled = false WHERE id = 'ep_a'`)
	e.Exec(`UPDATE relay.endpoints SET enabled = true WHERE id = 'ep_b'`)
	e.Exec(`DELETE FROM relay.endpoints WHERE id = 'ep_c'`)
	publish("a", "a2") // ep_a disabled: not for it
	publish("b", "b2") // ep_b enabled: for it

	e.startRelay(nil)
	e.WaitFor("every event final", 20*time.Second, func() bool {
		return e.Count(`SELECT count(DISTINCT event_id) FROM relay.deliveries WHERE state NOT IN ('pending', 'retrying')`) == 6 &&
			e.Count(`SELECT count(*) FROM relay.deliveries WHERE state IN ('pending', 'retrying')`) == 0
	})
	type route struct{ endpoint, state string }
	routes := map[string][]route{}
	rows, err := e.Pool.Query(context.Background(), `SELECT o.payload->>'n', d.endpoint_id, d.state FROM relay.deliveries d
JOIN relay.outbox o ON o.id = d.event_id WHERE o.payload->>'n' <> 'marker' ORDER BY 1, 2`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var n string
		var r route
		if err := rows.Scan(&n, &r.endpoint, &r.state); err != nil {
			t.Fatal(err)
		}
		routes[n] = append(routes[n], r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	// a1 and c1 were routed to an endpoint enabled when they committed; by
	// the time of the attempt it may have been disabled or deleted (the
	// change comes right after them in the stream), which says so.
	for n, ep := range map[string]string{"a1": "ep_a", "c1": "ep_c"} {
		got := routes[n]
		if len(got) != 1 || got[0].endpoint != ep || !slices.Contains([]string{"succeeded", "rejected"}, got[0].state) {
			t.Errorf("event %s: rows %v, want one at %s (succeeded, or rejected by the change after it)", n, got, ep)
		}
	}
	for _, n := range []string{"b1", "a2"} {
		if got := routes[n]; len(got) != 1 || got[0].endpoint != "" || got[0].state != "unrouted" {
			t.Errorf("event %s: rows %v, want unrouted (its endpoint was disabled when it committed)", n, got)
		}
	}
	if got := routes["b2"]; len(got) != 1 || got[0] != (route{"ep_b", "succeeded"}) {
		t.Errorf("event b2: rows %v, want succeeded at ep_b", got)
	}
	var atB []string
	for _, req := range rcvB.requests() {
		atB = append(atB, eventNString(t, req.body))
	}
	if !slices.Equal(atB, []string{"b2"}) {
		t.Errorf("ep_b's receiver got %v, want only b2", atB)
	}

	// Every version is recorded: the snapshot the first relay took, and
	// each change at its commit. Versions are written off the delivery
	// path, so b2's row can be final before the changes committed ahead of
	// it are recorded; the slot may not pass a change until its version
	// is, so once it has passed b2 every one of them must be there.
	e.WaitFor("the slot past b2", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id, pg_replication_slots s
WHERE o.payload->>'n' = 'b2' AND s.slot_name = $1 AND s.confirmed_flush_lsn > d.commit_lsn`, e.Slot) == 1
	})
	if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep_b' AND op = 'snapshot'`); got != 1 {
		t.Errorf("ep_b has %d snapshots, want 1", got)
	}
	if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep_b' AND op = 'update'`); got != 2 {
		t.Errorf("ep_b has %d recorded updates, want 2", got)
	}
	if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep_c' AND op = 'delete' AND config IS NULL`); got != 1 {
		t.Errorf("ep_c's deletion recorded %d times, want 1", got)
	}

	// Once the slot has moved past every change, pruning leaves one
	// version per live endpoint and forgets the deleted one.
	e.WaitFor("the slot past the last change", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM pg_replication_slots s WHERE s.slot_name = $1
AND s.confirmed_flush_lsn > (SELECT max(commit_lsn) FROM relay.endpoint_history)`, e.Slot) == 1
	})
	e.Exec(pruneHistorySQL)
	if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep_c'`); got != 0 {
		t.Errorf("ep_c, deleted, still has %d versions after pruning", got)
	}
	for _, ep := range []string{"ep_a", "ep_b"} {
		if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = $1`, ep); got != 1 {
			t.Errorf("%s has %d versions after pruning, want 1", ep, got)
		}
	}
	if got := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep_a' AND config->>'enabled' = 'f'`); got != 1 {
		t.Errorf("ep_a's remaining version is not its latest (disabled)")
	}
}

func eventNString(t *testing.T, body []byte) string {
	t.Helper()
	var p struct{ N string }
	if err := json.Unmarshal(body, &p); err != nil {
		t.Errorf("payload %q: %v", body, err)
	}
	return p.N
}

// A transaction that changes one endpoint several times leaves one version,
// its last, and says whether the endpoint existed before the transaction.
func TestHistoryBatchKeepsTheLastVersionPerCommit(t *testing.T) {
	s := func(v string) *string { return &v }
	var h historyBatch
	h.add(historyEntry{id: "a", lsn: 10, op: "insert", row: mapRow{"url": s("http://one")}})
	h.add(historyEntry{id: "a", lsn: 10, op: "update", row: mapRow{"url": s("http://two")}})
	h.add(historyEntry{id: "b", lsn: 10, op: "delete"})
	h.add(historyEntry{id: "b", lsn: 10, op: "insert", row: mapRow{"url": s("http://three")}})
	h.add(historyEntry{id: "a", lsn: 20, op: "delete"})
	if len(h.entries) != 3 {
		t.Fatalf("%d entries, want 3: %+v", len(h.entries), h.entries)
	}
	want := []struct {
		id, op, url string
		lsn         int
	}{{"a", "insert", "http://two", 10}, {"b", "update", "http://three", 10}, {"a", "delete", "", 20}}
	for i, w := range want {
		e := h.entries[i]
		url := ""
		if e.row != nil && e.row["url"] != nil {
			url = *e.row["url"]
		}
		if e.id != w.id || e.op != w.op || url != w.url || int(e.lsn) != w.lsn {
			t.Errorf("entry %d: %s %s %q at %d, want %s %s %q at %d", i, e.id, e.op, url, e.lsn, w.id, w.op, w.url, w.lsn)
		}
	}
	if taken := h.take(); len(taken) != 3 {
		t.Errorf("took %d entries, want 3", len(taken))
	}
	h.add(historyEntry{id: "a", lsn: 10, op: "update"})
	if len(h.entries) != 1 || h.entries[0].op != "update" {
		t.Errorf("after take: %+v", h.entries)
	}
}

// The slot is never acknowledged past an endpoint change whose version is
// not recorded yet (invariant 1): while the history table is locked, the
// confirmed position stays before the change. The write is off the
// dispatcher's path, so the event committed after the change is delivered
// meanwhile, with the new version; once the write goes through, the slot
// moves on.
func TestChangeIsRecordedBeforeItIsAcknowledged(t *testing.T) {
	t.Parallel()
	e, _ := relayPastStartup(t)
	ctx := context.Background()
	unlock := lockHistory(t, e)
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 5000 WHERE id = 'ep'`)
	var changeEnd string
	if err := e.Pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&changeEnd); err != nil {
		t.Fatal(err)
	}
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'after', '{}')`)
	confirmedPast := func() bool {
		return e.Count(`SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::pg_lsn`, e.Slot, changeEnd) == 1
	}
	e.WaitFor("the event after the change delivered while the change is unrecorded", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'after' AND state = 'succeeded'`) == 1
	})
	time.Sleep(1500 * time.Millisecond) // fifteen status intervals
	if confirmedPast() {
		t.Fatal("the slot was acknowledged past an endpoint change whose history row is not written")
	}
	if n := e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep' AND op = 'update'`); n != 0 {
		t.Fatalf("%d update versions visible while the table is locked", n)
	}
	unlock()
	e.WaitFor("the change recorded, the event delivered, the slot past both", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE endpoint_id = 'ep' AND op = 'update' AND config->>'timeout_ms' = '5000'`) == 1 &&
			e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'after' AND state = 'succeeded'`) == 1 &&
			confirmedPast()
	})
}

// A version whose write hangs holds the stream back once it has waited
// historyLag: events committed meanwhile are delivered, later ones wait
// in the slot instead of piling up watermark marks in memory, and all
// are delivered once the write goes through.
func TestHistoryStallHoldsTheStreamBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(func(c *Config) { c.historyLag = 300 * time.Millisecond })
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'warm', '{}')`)
	e.WaitFor("the first event delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'warm' AND state = 'succeeded'`) == 1
	})
	unlock := lockHistory(t, e)
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 5000 WHERE id = 'ep'`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'soon', '{}')`)
	e.WaitFor("the event right after the change delivered", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'soon' AND state = 'succeeded'`) == 1
	})
	time.Sleep(500 * time.Millisecond) // past historyLag
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'late', '{}')`)
	time.Sleep(1500 * time.Millisecond)
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'late'`); n != 0 {
		t.Fatalf("an event committed %s after an unwritten version was routed (%d rows): the dispatcher ran ahead", 500*time.Millisecond, n)
	}
	unlock()
	e.WaitFor("the late event delivered once the version is written", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'late' AND state = 'succeeded'`) == 1
	})
	if got := len(rcv.requests()); got != 3 {
		t.Errorf("receiver got %d requests, want 3", got)
	}
}

// lockHistory blocks writes to relay.endpoint_history (reads go on) until
// the returned func is called or the test ends.
func lockHistory(t *testing.T, e *env) (unlock func()) {
	t.Helper()
	ctx := context.Background()
	lock, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lock.Rollback(ctx) })
	if _, err := lock.Exec(ctx, `LOCK TABLE relay.endpoint_history IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := lock.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// A first start records a snapshot of every endpoint it has no history
// for (invariant 2) without holding deliveries back, and the slot is not
// acknowledged past the starting position until the snapshot is written.
func TestStartupSnapshotHoldsTheSlotNotDeliveries(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep_a", "t", rcv)
	e.addEndpoint("ep_b", "t", rcv)
	unlock := lockHistory(t, e)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("the event delivered to both endpoints while the snapshot waits", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'x' AND state = 'succeeded'`) == 2
	})
	confirmedPast := func() bool {
		return e.Count(`SELECT count(*) FROM pg_replication_slots s WHERE s.slot_name = $1
AND s.confirmed_flush_lsn > (SELECT max(commit_lsn) FROM relay.deliveries WHERE event_type = 'x')`, e.Slot) == 1
	}
	time.Sleep(1500 * time.Millisecond) // fifteen status intervals
	if confirmedPast() {
		t.Fatal("the slot was acknowledged past the event while the startup snapshot is unwritten")
	}
	unlock()
	e.WaitFor("the snapshot written and the slot past the event", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_history WHERE op = 'snapshot' AND endpoint_id IN ('ep_a', 'ep_b')`) == 2 &&
			confirmedPast()
	})
}

// Versions queued twice for the same commit (a transaction the stream sent
// again) are written once, the later winning, in queue order otherwise.
func TestMergeHistoryWritesEachVersionOnce(t *testing.T) {
	s := func(v string) *string { return &v }
	jobs := []historyJob{
		{entries: []historyEntry{{id: "a", lsn: 10, op: "update", row: mapRow{"url": s("one")}}, {id: "b", lsn: 10, op: "delete"}}},
		{entries: []historyEntry{{id: "c", lsn: 20, op: "insert", row: mapRow{"url": s("c")}}}},
		{entries: []historyEntry{{id: "a", lsn: 10, op: "update", row: mapRow{"url": s("two")}}, {id: "a", lsn: 30, op: "delete"}}},
	}
	got := mergeHistory(jobs)
	var desc []string
	for _, e := range got {
		d := e.id + "@" + e.lsn.String() + ":" + e.op
		if e.row != nil {
			d += ":" + *e.row["url"]
		}
		desc = append(desc, d)
	}
	want := []string{"a@0/A:update:two", "b@0/A:delete", "c@0/14:insert:c", "a@0/1E:delete"}
	if !slices.Equal(desc, want) {
		t.Errorf("merged %v, want %v", desc, want)
	}
	if one := mergeHistory(jobs[:1]); len(one) != 2 {
		t.Errorf("one job: %d entries, want its 2", len(one))
	}
}

// What writeHistory stores for a row is valid JSON in UTF-8 (Postgres
// refuses anything else), with keys sorted and NULL as null, for every
// kind of text a column can hold; and parseRowJSON reads it back as
// encoding/json does.
func TestRowJSONRoundTrips(t *testing.T) {
	s := func(v string) *string { return &v }
	texts := []string{"", "plain", `quote " and \ backslash`, "tab\tnew\nline\rcr", "\x01\x1f\x7f",
		"<html> & co", "ünïcödé €", "emoji 🎉", "bad \xff utf8 \xc3", "line\u2028sep", `{"a":[1,2]}`}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		b := make([]byte, rng.IntN(40))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		texts = append(texts, string(b))
	}
	for i, text := range texts {
		row := mapRow{"id": s("ep"), "url": s(text), "headers": nil, text: s("key is the text")}
		got, err := rowJSON(row)
		if err != nil {
			t.Fatal(err)
		}
		if !json.Valid([]byte(got)) || !utf8.ValidString(got) {
			t.Fatalf("text %d %q: invalid JSON or UTF-8 (Postgres refuses either) %q", i, text, got)
		}
		var want mapRow
		if err := json.Unmarshal([]byte(got), &want); err != nil {
			t.Fatal(err)
		}
		parsed, ok := parseRowJSON(got)
		if !ok || len(parsed) != len(want) {
			t.Fatalf("text %d %q: %s parsed to %v (ok %v), want %d keys", i, text, got, parsed, ok, len(want))
		}
		for k, v := range want {
			w, ok := parsed[k]
			if !ok || (v == nil) != (w == nil) || (v != nil && *v != *w) {
				t.Fatalf("text %d %q: key %q parses differently from encoding/json: %s", i, text, k, got)
			}
		}
	}
	if got, _ := rowJSON(mapRow{"b": nil, "a": s("x")}); got != `{"a":"x","b":null}` {
		t.Errorf("got %s, want keys sorted and null for NULL", got)
	}
}

// parseRowJSON gives what encoding/json gives for every object of string
// and null values (as writeHistory stores them and as Postgres prints
// them back, raw <, > and & included), and refuses anything else, which the caller then hands to
// encoding/json.
func TestParseRowJSONDecodesAsEncodingJSON(t *testing.T) {
	s := func(v string) *string { return &v }
	rng := rand.New(rand.NewPCG(3, 4))
	var inputs []string
	for range 300 {
		b := make([]byte, rng.IntN(30))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		m, err := rowJSON(mapRow{"id": s("ep"), "v": s(string(b)), "n": nil})
		if err != nil {
			t.Fatal(err)
		}
		inputs = append(inputs, m)
	}
	inputs = append(inputs,
		`{}`, ` { } `, `{"a": "x", "b": null}`, "{\n\t\"a\" : \"x\" ,\r\n \"b\":null}",
		`{"e": "\"\\\/\b\f\n\r\t"}`, `{"u": "\u00e9\u20ac\ud83c\udf89"}`, `{"lone": "\ud83c x"}`, `{"lone2": "\udf89"}`,
		`{"upper": "\u00E9"}`, `{"dup": "1", "dup": "2"}`, `{"h": "<a> & b"}`,
		// Not objects of strings: refused.
		`{"n": 1}`, `{"b": true}`, `{"a": ["x"]}`, `{"o": {}}`, `["x"]`, `"x"`, `{"a": "x"} junk`, `{"a": "x",}`,
		`{"a" "x"}`, `{"a": "x"`, `{"a": "\x"}`, `{"a": "\u12"}`, "{\"a\": \"raw\ttab\"}", `{"a": nul}`, `{"a": "x" "b": "y"}`, ``, `{`)
	for _, in := range inputs {
		got, ok := parseRowJSON(in)
		var want mapRow
		wantErr := json.Unmarshal([]byte(in), &want)
		if !ok {
			// Refused: fine where encoding/json refuses too, or where the
			// object has a value that is not a string or null.
			var generic map[string]any
			if json.Unmarshal([]byte(in), &generic) == nil && wantErr == nil && utf8.ValidString(in) {
				t.Errorf("%q refused, but it is an object of strings and nulls", in)
			}
			continue
		}
		if wantErr != nil {
			t.Errorf("%q accepted as %v; encoding/json refuses it: %v", in, got, wantErr)
			continue
		}
		if len(got) != len(want) {
			t.Errorf("%q: %d keys, want %d", in, len(got), len(want))
			continue
		}
		for k, v := range want {
			g, ok := got[k]
			if !ok || (v == nil) != (g == nil) || (v != nil && *v != *g) {
				t.Errorf("%q: key %q decodes differently from encoding/json", in, k)
			}
		}
	}
}
