package dlq_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/dlq"
)

// Deliveries to a receiver that answers 500 end dead after the schedule,
// show up in relay.dead_letters with their reason and status, and after
// the receiver recovers, replaying one and then all delivers each exactly
// once more, with the webhook-id it had.
func TestReplayAfterRecovery(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep_a", "acme", rcv)
	stop := e.startRelay(0, 50*time.Millisecond) // two attempts

	ids := []string{e.publish("acme", "invoice.paid"), e.publish("acme", "invoice.paid"), e.publish("acme", "invoice.voided")}
	e.WaitFor("3 dead deliveries", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'dead'`) == 3
	})

	// The view, as an operator reads it with psql.
	rows, err := e.Pool.Query(ctx, `SELECT event_id::text, webhook_id, endpoint_id, tenant_id, state, reason, attempts,
    last_http_status, replay_count, replayable, payload::text FROM relay.dead_letters ORDER BY event_id`)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rows.Next() {
		var id, webhookID, ep, tenant, state, reason, payload string
		var attempts, status, replays int
		var replayable bool
		if err := rows.Scan(&id, &webhookID, &ep, &tenant, &state, &reason, &attempts, &status, &replays, &replayable, &payload); err != nil {
			t.Fatal(err)
		}
		n++
		if webhookID != dlq.WebhookID(id) || ep != "ep_a" || tenant != "acme" || state != "dead" || attempts != 2 ||
			status != 500 || replays != 0 || !replayable || payload != `{"n": 1}` {
			t.Errorf("dead letter %s: webhook_id %s endpoint %s tenant %s state %s attempts %d status %d replays %d replayable %v payload %s",
				id, webhookID, ep, tenant, state, attempts, status, replays, replayable, payload)
		}
		if !strings.Contains(reason, "attempts exhausted (2)") || !strings.Contains(reason, "down for maintenance") {
			t.Errorf("dead letter %s: reason %q lacks the exhaustion or the response body", id, reason)
		}
	}
	if rows.Err() != nil || n != 3 {
		t.Fatalf("relay.dead_letters has %d rows (err %v), want 3", n, rows.Err())
	}
	for _, id := range ids {
		if got := rcv.count(dlq.WebhookID(id)); got != 2 {
			t.Fatalf("receiver got %s %d times before recovery, want 2", id, got)
		}
	}

	// Get, by webhook-id, with the attempt history.
	got, err := dlq.Get(ctx, e.Pool, dlq.WebhookID(ids[0]), "ep_a")
	if err != nil {
		t.Fatal(err)
	}
	if got.EventID != ids[0] || got.HTTPStatus != 500 || got.Attempts != 2 || got.CompletedAt.IsZero() || len(got.History) != 2 {
		t.Fatalf("Get = %+v", got)
	}
	for i, a := range got.History {
		if a.Attempt != i+1 || a.HTTPStatus != 500 || a.ErrorClass == "" || a.AttemptedAt.IsZero() {
			t.Errorf("attempt %d = %+v", i, a)
		}
	}

	rcv.recovered.Store(true)
	ok, err := dlq.Replay(ctx, e.Pool, dlq.WebhookID(ids[0]), "ep_a")
	if err != nil || !ok {
		t.Fatalf("Replay = %v, %v; want true", ok, err)
	}
	e.WaitFor("the replayed delivery to succeed", 20*time.Second, func() bool { return e.state(ids[0], "ep_a") == "succeeded" })
	var attempts, replays int
	var replayedAt *time.Time
	if err := e.Pool.QueryRow(ctx, `SELECT attempts, replay_count, replayed_at FROM relay.deliveries WHERE event_id = $1::uuid`, ids[0]).
		Scan(&attempts, &replays, &replayedAt); err != nil {
		t.Fatal(err)
	}
	if attempts != 1 || replays != 1 || replayedAt == nil {
		t.Errorf("after replay: attempts %d replay_count %d replayed_at %v; want 1, 1, set", attempts, replays, replayedAt)
	}
	if got := rcv.count(dlq.WebhookID(ids[0])); got != 3 {
		t.Errorf("replayed event reached the receiver %d times in all, want 2 failures + 1", got)
	}
	for _, id := range ids[1:] {
		if s := e.state(id, "ep_a"); s != "dead" {
			t.Errorf("event %s not replayed is %s, want dead", id, s)
		}
	}

	n, err = dlq.ReplayAll(ctx, e.Pool, dlq.Filter{})
	if err != nil || n != 2 {
		t.Fatalf("ReplayAll = %d, %v; want 2", n, err)
	}
	e.WaitFor("every delivery to succeed", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded' AND replay_count = 1`) == 3
	})
	// Stopping waits for every attempt the relay started: what the
	// receiver has now is all it will ever get.
	stop()
	for _, id := range ids {
		if got := rcv.count(dlq.WebhookID(id)); got != 3 {
			t.Errorf("event %s reached the receiver %d times, want 2 failures + 1 replay", id, got)
		}
	}
	if got := rcv.total(); got != 9 {
		t.Errorf("receiver got %d requests in all, want 9", got)
	}
	if left, err := dlq.List(ctx, e.Pool, dlq.Filter{}); err != nil || len(left) != 0 {
		t.Errorf("List after replay = %d entries, %v; want none", len(left), err)
	}
}

// Many concurrent replays of one dead letter, one by one and all at once,
// replay it once and the receiver gets it once.
func TestConcurrentReplaysDeliverOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep_c", "acme", rcv)
	stop := e.startRelay(0) // one attempt
	id := e.publish("acme", "invoice.paid")
	e.WaitFor("the delivery to die", 20*time.Second, func() bool { return e.state(id, "ep_c") == "dead" })
	rcv.recovered.Store(true)

	const callers = 10
	var wg sync.WaitGroup
	start := make(chan struct{})
	results := make([]int, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			<-start
			if i%2 == 0 {
				var ok bool
				ok, errs[i] = dlq.Replay(ctx, e.Pool, id, "ep_c")
				if ok {
					results[i] = 1
				}
			} else {
				results[i], errs[i] = dlq.ReplayAll(ctx, e.Pool, dlq.Filter{EndpointID: "ep_c"})
			}
		})
	}
	close(start)
	wg.Wait()
	replayed := 0
	for i := range callers {
		if errs[i] != nil {
			t.Errorf("caller %d: %v", i, errs[i])
		}
		replayed += results[i]
	}
	if replayed != 1 {
		t.Fatalf("%d concurrent replays replayed %d times, want 1 (results %v)", callers, replayed, results)
	}
	e.WaitFor("the replayed delivery to succeed", 20*time.Second, func() bool { return e.state(id, "ep_c") == "succeeded" })
	stop()
	if got := rcv.count(dlq.WebhookID(id)); got != 2 {
		t.Errorf("receiver got the event %d times, want 1 failure + 1 replay", got)
	}
	if n := e.Count(`SELECT replay_count FROM relay.deliveries WHERE event_id = $1::uuid`, id); n != 1 {
		t.Errorf("replay_count = %d, want 1", n)
	}
}

// seed writes delivery rows directly: the filters are about rows, not
// about how the relay came to write them.
func seed(e *env) {
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, attempts, http_status, error,
    completed_at, payload) VALUES
  ('00000000-0000-0000-0000-000000000001', 'ep_a', 'acme',   'x', 'dead',      8, 503,  'attempts exhausted (8): 503', '2026-01-01T10:00:00Z', '{"i":1}'),
  ('00000000-0000-0000-0000-000000000002', 'ep_a', 'acme',   'x', 'failed',    1, 400,  'HTTP 400: bad',               '2026-01-02T10:00:00Z', '{"i":2}'),
  ('00000000-0000-0000-0000-000000000003', 'ep_b', 'acme',   'x', 'rejected',  0, NULL, 'endpoint ep_b is disabled',   '2026-01-03T10:00:00Z', '{"i":3}'),
  ('00000000-0000-0000-0000-000000000004', 'ep_c', 'globex', 'x', 'dead',      8, 500,  'attempts exhausted (8): 500', '2026-01-04T10:00:00Z', '{"i":4}'),
  ('00000000-0000-0000-0000-000000000005', 'ep_a', 'acme',   'x', 'succeeded', 1, 200,  NULL,                          '2026-01-02T12:00:00Z', NULL),
  ('00000000-0000-0000-0000-000000000006', 'ep_a', 'acme',   'x', 'dead',      8, 500,  'attempts exhausted (8): 500', '2026-01-05T10:00:00Z', NULL)`)
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, attempts, next_attempt_at, payload)
VALUES ('00000000-0000-0000-0000-000000000007', 'ep_a', 'acme', 'x', 'retrying', 2, now() + interval '1 hour', '{"i":7}')`)
}

func eventNums(entries []dlq.Entry) string {
	var b strings.Builder
	for _, e := range entries {
		b.WriteByte(e.EventID[len(e.EventID)-1])
	}
	return b.String()
}

func ts(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

func TestFilters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := newEnv(t)
	seed(e)
	for _, tc := range []struct {
		name string
		f    dlq.Filter
		want string // event numbers, newest first
	}{
		{"all", dlq.Filter{}, "64321"},
		{"endpoint", dlq.Filter{EndpointID: "ep_a"}, "621"},
		{"tenant", dlq.Filter{TenantID: "globex"}, "4"},
		{"endpoint and tenant", dlq.Filter{EndpointID: "ep_a", TenantID: "globex"}, ""},
		{"since", dlq.Filter{Since: ts("2026-01-03T10:00:00Z")}, "643"},
		{"until is exclusive", dlq.Filter{Until: ts("2026-01-03T10:00:00Z")}, "21"},
		{"window", dlq.Filter{Since: ts("2026-01-02T00:00:00Z"), Until: ts("2026-01-04T00:00:00Z")}, "32"},
		{"event", dlq.Filter{EventID: "msg_00000000000000000000000000000003"}, "3"},
		{"limit", dlq.Filter{Limit: 2}, "64"},
	} {
		got, err := dlq.List(ctx, e.Pool, tc.f)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if eventNums(got) != tc.want {
			t.Errorf("%s: List = %q, want %q", tc.name, eventNums(got), tc.want)
		}
	}
	got, err := dlq.List(ctx, e.Pool, dlq.Filter{EventID: "00000000-0000-0000-0000-000000000001"})
	if err != nil || len(got) != 1 {
		t.Fatal(got, err)
	}
	if g := got[0]; g.WebhookID != "msg_00000000000000000000000000000001" || g.State != "dead" || g.HTTPStatus != 503 ||
		g.Reason != "attempts exhausted (8): 503" || !g.Replayable || string(g.Payload) != `{"i": 1}` || !g.CompletedAt.Equal(ts("2026-01-01T10:00:00Z")) {
		t.Errorf("entry = %+v", g)
	}

	// Lookups that find nothing say so.
	for _, tc := range []struct{ event, endpoint, want string }{
		{"00000000-0000-0000-0000-0000000000ff", "ep_a", "no delivery for event 00000000-0000-0000-0000-0000000000ff at endpoint ep_a"},
		{"00000000-0000-0000-0000-000000000001", "ep_zzz", "no delivery for event 00000000-0000-0000-0000-000000000001 at endpoint ep_zzz"},
		{"00000000-0000-0000-0000-000000000005", "ep_a", "is succeeded, not a dead letter"},
	} {
		_, err := dlq.Get(ctx, e.Pool, tc.event, tc.endpoint)
		if !errors.Is(err, dlq.ErrNotFound) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Get(%s, %s) = %v; want ErrNotFound saying %q", tc.event, tc.endpoint, err, tc.want)
		}
	}
	if _, err := dlq.Replay(ctx, e.Pool, "00000000-0000-0000-0000-0000000000ff", "ep_a"); !errors.Is(err, dlq.ErrNotFound) {
		t.Errorf("Replay of an unknown delivery: %v, want ErrNotFound", err)
	}
	if _, err := dlq.Get(ctx, e.Pool, "nope", "ep_a"); !errors.Is(err, dlq.ErrInvalidEventID) {
		t.Errorf("Get with a bad id: %v, want ErrInvalidEventID", err)
	}
	if ok, err := dlq.Replay(ctx, e.Pool, "00000000-0000-0000-0000-000000000006", "ep_a"); ok || !errors.Is(err, dlq.ErrNoPayload) {
		t.Errorf("Replay without payload = %v, %v; want ErrNoPayload", ok, err)
	}
	for _, id := range []string{"00000000-0000-0000-0000-000000000005", "00000000-0000-0000-0000-000000000007"} {
		if ok, err := dlq.Replay(ctx, e.Pool, id, "ep_a"); ok || err != nil {
			t.Errorf("Replay of a row that is not a dead letter (%s) = %v, %v; want false, nil", id, ok, err)
		}
	}

	// ReplayAll with filters changes exactly the rows List selects.
	n, err := dlq.ReplayAll(ctx, e.Pool, dlq.Filter{EndpointID: "ep_a", Since: ts("2026-01-02T00:00:00Z")})
	if err != nil || n != 1 {
		t.Fatalf("ReplayAll(ep_a, since 01-02) = %d, %v; want 1", n, err)
	}
	if s := e.state("00000000-0000-0000-0000-000000000002", "ep_a"); s != "pending" {
		t.Errorf("event 2 is %s after replay, want pending", s)
	}
	n, err = dlq.ReplayAll(ctx, e.Pool, dlq.Filter{TenantID: "globex"})
	if err != nil || n != 1 {
		t.Fatalf("ReplayAll(globex) = %d, %v; want 1", n, err)
	}
	if got, _ := dlq.List(ctx, e.Pool, dlq.Filter{}); eventNums(got) != "631" {
		t.Errorf("left after filtered replays: %q, want \"631\"", eventNums(got))
	}
	// The replayed row is reset with a fresh budget and recorded.
	var state, errText *string
	var attempts, replays int
	var status *int
	var completed, claimed *time.Time
	var due bool
	if err := e.Pool.QueryRow(ctx, `SELECT state, attempts, http_status, error, completed_at, claimed_until,
    next_attempt_at <= now(), replay_count FROM relay.deliveries WHERE event_id = '00000000-0000-0000-0000-000000000004'`).
		Scan(&state, &attempts, &status, &errText, &completed, &claimed, &due, &replays); err != nil {
		t.Fatal(err)
	}
	if *state != "pending" || attempts != 0 || status != nil || errText != nil || completed != nil || claimed != nil || !due || replays != 1 {
		t.Errorf("replayed row: state %s attempts %d status %v error %v completed %v claimed %v due %v replays %d",
			*state, attempts, status, errText, completed, claimed, due, replays)
	}
}

// ReplayAll works in batches and stops: a large queue is replayed whole,
// Limit caps it, and a row that dies again during a run is not replayed
// twice by it.
func TestReplayAllBatches(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := newEnv(t)
	e.Exec(`INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, attempts, error, completed_at, payload)
SELECT gen_random_uuid(), 'ep_a', 'acme', 'x', 'dead', 3, 'attempts exhausted (3)', now() - i * interval '1 second', '{}'
FROM generate_series(1, 2500) i`)
	n, err := dlq.ReplayAll(ctx, e.Pool, dlq.Filter{Limit: 1200})
	if err != nil || n != 1200 {
		t.Fatalf("ReplayAll(limit 1200) = %d, %v", n, err)
	}
	n, err = dlq.ReplayAll(ctx, e.Pool, dlq.Filter{})
	if err != nil || n != 1300 {
		t.Fatalf("ReplayAll = %d, %v; want the 1300 left", n, err)
	}
	if left := e.Count(`SELECT count(*) FROM relay.dead_letters`); left != 0 {
		t.Errorf("%d dead letters left", left)
	}

	// The guard ReplayAll relies on: rows replayed at or after
	// replayed_before are skipped even when they are dead again.
	e.Exec(`UPDATE relay.deliveries SET state = 'dead', completed_at = now()`)
	if n := e.Count(`SELECT relay.replay_dead_letters(max_rows => 10, replayed_before => now() - interval '1 hour')`); n != 0 {
		t.Errorf("replayed %d rows that were replayed after replayed_before", n)
	}
	// From psql, one call replays every match in one transaction.
	if n := e.Count(`SELECT relay.replay_dead_letters(endpoint_id => 'ep_a')`); n != 2500 {
		t.Errorf("replay_dead_letters(endpoint_id => 'ep_a') = %d, want 2500", n)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE replay_count = 2 AND state = 'pending'`); n != 2500 {
		t.Errorf("%d rows replayed twice and pending, want 2500", n)
	}
	// Applying the schema again changes nothing (and keeps the functions).
	if err := outboxrelay.Migrate(ctx, e.Pool); err != nil {
		t.Fatal(err)
	}
	if n := e.Count(`SELECT count(*) FROM relay.dead_letters`); n != 0 {
		t.Errorf("dead letters after re-migrate: %d", n)
	}
}

func TestParseEventID(t *testing.T) {
	const want = "0190a5d2-7c1e-7a3b-9f00-1234567890ab"
	for _, in := range []string{want, "0190A5D2-7C1E-7A3B-9F00-1234567890AB", "0190a5d27c1e7a3b9f001234567890ab",
		"msg_0190a5d27c1e7a3b9f001234567890ab", " " + want + "\n"} {
		got, err := dlq.ParseEventID(in)
		if err != nil || got != want {
			t.Errorf("ParseEventID(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "msg_", "msg_0190a5d27c1e7a3b9f001234567890", "0190a5d2-7c1e-7a3b-9f00-1234567890ag", "ep_a"} {
		if _, err := dlq.ParseEventID(in); !errors.Is(err, dlq.ErrInvalidEventID) {
			t.Errorf("ParseEventID(%q) = %v, want ErrInvalidEventID", in, err)
		}
	}
	if got := dlq.WebhookID(want); got != "msg_0190a5d27c1e7a3b9f001234567890ab" {
		t.Errorf("WebhookID = %q", got)
	}
}
