package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

// Deliveries that leave memory (here: queued behind an open circuit) are
// pending rows without their payload; the loader reads payload, headers
// and traceparent back from the outbox row, and the receiver gets them
// intact. The cleanup keeps an outbox row a pending row refers to; a
// delivery whose outbox row was deleted anyway ends dead, saying why.
func TestSpilledRowsReadTheirPayloadFromTheOutbox(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	var healthy atomic.Bool
	rcv.answer = func(int, *http.Request) int {
		if healthy.Load() {
			return 200
		}
		return 503
	}
	e.addEndpoint("ep", "t", rcv)
	e.Exec(`UPDATE relay.endpoints SET breaker_failures = 1, breaker_cooldown_ms = 1500 WHERE id = 'ep'`)
	r, _ := e.startRelay(func(c *Config) {
		c.RetrySchedule = []time.Duration{0, 10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond}
	})

	// One failure opens the circuit; what queues behind it is evicted.
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'trip', '{"trip": true}')`)
	e.WaitFor("circuit open", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_health WHERE endpoint_id = 'ep' AND breaker_state = 'open'`) == 1
	})
	const n = 20
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, headers, traceparent)
SELECT 't', 'spill', jsonb_build_object('i', i, 'text', 'ünïcode ' || i), jsonb_build_object('X-Seq', i::text),
       '00-0af7651916cd43dd8448eb211c80319c-' || lpad(to_hex(i), 16, '0') || '-01'
FROM generate_series(1, $1) i`, n)
	// The head stays in memory, to be the probe.
	e.WaitFor("spilled rows", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'spill' AND state = 'pending'
AND payload IS NULL AND headers IS NULL AND traceparent IS NULL`) == n-1
	})

	// The cleanup keeps what pending rows refer to, removes the rest.
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, created_at) VALUES ('nobody', 'old', '{}', now() - interval '1 hour')`)
	r.cleanupOlder(context.Background(), time.Millisecond, 7*24*time.Hour, 30*24*time.Hour)
	if got := e.Count(`SELECT count(*) FROM relay.outbox o WHERE event_type = 'spill' AND EXISTS (
SELECT 1 FROM relay.deliveries d WHERE d.event_id = o.id AND d.state = 'pending' AND d.payload IS NULL)`); got != n-1 {
		t.Fatalf("cleanup left %d of the %d outbox rows pending deliveries refer to", got, n-1)
	}
	if got := e.Count(`SELECT count(*) FROM relay.outbox WHERE event_type = 'spill'`); got != n-1 {
		t.Fatalf("cleanup left %d outbox rows of the spill events, want the %d referred to (the head is in memory)", got, n-1)
	}
	if got := e.Count(`SELECT count(*) FROM relay.outbox WHERE event_type = 'old'`); got != 0 {
		t.Fatalf("cleanup kept an old outbox row nothing refers to")
	}

	// One outbox row deleted by hand: its delivery cannot be made.
	var goneID string
	if err := e.Pool.QueryRow(context.Background(), `DELETE FROM relay.outbox WHERE id = (
SELECT id FROM relay.outbox WHERE event_type = 'spill' AND (payload->>'i')::int = 7) RETURNING id::text`).Scan(&goneID); err != nil {
		t.Fatal(err)
	}
	healthy.Store(true)
	e.WaitFor("all delivered or dead", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_type = 'spill' AND state IN ('succeeded', 'dead')`) == n
	})
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_id = $1::uuid AND state = 'dead' AND error LIKE '%outbox row%deleted%'`, goneID); got != 1 {
		t.Errorf("the delivery whose outbox row was deleted is not dead with the reason")
	}
	seen := map[int]bool{}
	for _, req := range rcv.requests() {
		var body struct {
			I    int    `json:"i"`
			Text string `json:"text"`
		}
		if json.Unmarshal(req.body, &body) != nil || body.I == 0 || req.verifyErr != nil {
			continue // the trip event, or the failed attempts
		}
		seen[body.I] = true
		if want := fmt.Sprintf(`{"i": %d, "text": "ünïcode %d"}`, body.I, body.I); string(req.body) != want {
			t.Errorf("body %s, want %s", req.body, want)
		}
		if got := req.header.Get("X-Seq"); got != fmt.Sprint(body.I) {
			t.Errorf("event %d: X-Seq = %q", body.I, got)
		}
		if got, want := req.header.Get("Traceparent"), fmt.Sprintf("00-0af7651916cd43dd8448eb211c80319c-%016x-01", body.I); got != want {
			t.Errorf("event %d: traceparent %q, want %q", body.I, got, want)
		}
	}
	if len(seen) != n-1 || seen[7] {
		t.Errorf("received %d distinct spilled events (7 among them: %v), want %d without 7", len(seen), seen[7], n-1)
	}
}
