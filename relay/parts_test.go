package relay

import (
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// partsOf has transactions of more than about 200 small events come in
// parts (cdc.Txn.More).
func partsOf(c *Config) { c.StreamBatchBytes = 16 << 10 }

// A transaction larger than the stream's batch bound comes in parts, and
// an ordered endpoint still gets its events in commit order: event_seq
// goes on across the parts.
func TestLargeTransactionInPartsKeepsOrder(t *testing.T) {
	t.Parallel()
	const events = 3000
	e := newEnv(t)
	ord, plain := newReceiver(t), newReceiver(t)
	e.addEndpoint("ord", "acme", ord)
	e.addEndpoint("plain", "acme", plain)
	e.Exec(`UPDATE relay.endpoints SET ordered = true WHERE id = 'ord'`)
	e.startRelay(partsOf)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'acme', 'x', jsonb_build_object('n', i) FROM generate_series(0, $1 - 1) i`, events)
	e.WaitFor("every delivery to succeed", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 2*events
	})
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != 2*events {
		t.Errorf("%d rows, want %d", got, 2*events)
	}
	order, _, _ := firstArrivals(t, ord)
	if !slices.Equal(order, upTo(0, events)) {
		t.Errorf("the ordered endpoint's first arrivals are not commit order (%d of them)", len(order))
	}
	e.checkOrderKey("ord", upTo(0, events))
	if n := len(plain.requests()); n != events {
		t.Errorf("the plain endpoint got %d requests, want %d", n, events)
	}
}

// A relay stopped in the middle of a transaction that comes in parts is
// followed by one that delivers the rest, and does not send again the
// events that have a row: the parts' rows move relay_state.recorded_lsn
// to the transaction's commit, so the replay looks them up.
func TestLargeTransactionInPartsAcrossARestart(t *testing.T) {
	t.Parallel()
	const events = 3000
	e := newEnv(t)
	rcv := newReceiver(t)
	rcv.answer = func(int, *http.Request) int {
		time.Sleep(time.Millisecond)
		return http.StatusOK
	}
	e.addEndpoint("ep", "acme", rcv)
	// Small blocking queues: the relay reads the transaction only as
	// fast as it delivers, so the stop comes with parts still unread.
	cfg := func(c *Config) {
		partsOf(c)
		c.Overflow, c.QueueEvents = OverflowBlock, 100
	}
	_, stop := e.startRelay(cfg)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'acme', 'x', jsonb_build_object('n', i) FROM generate_series(0, $1 - 1) i`, events)
	e.WaitFor("some deliveries", 20*time.Second, func() bool { return len(rcv.requests()) >= 300 })
	stop()
	before := len(rcv.requests())
	recorded := e.Count(`SELECT count(*) FROM relay.deliveries`)
	if recorded >= events {
		t.Fatalf("the first relay recorded %d of %d events: not stopped mid-transaction", recorded, events)
	}
	e.startRelay(cfg)
	e.WaitFor("every delivery to succeed", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == events
	})
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != events {
		t.Errorf("%d rows, want %d", got, events)
	}
	seen := map[int]int{}
	for _, r := range rcv.requests() {
		seen[eventN(t, r.body)]++
	}
	again := 0
	for _, c := range seen {
		again += c - 1
	}
	t.Logf("first relay: %d requests, %d rows; %d events sent twice", before, recorded, again)
	if len(seen) != events || again > before-recorded {
		t.Errorf("%d distinct events, %d sent twice; want %d, and at most the %d sent without a row at the stop", len(seen), again, events, before-recorded)
	}
}

// With the receiver down, a transaction that comes in parts spills past
// the queue like any backlog: every event gets a row, the slot is
// acknowledged past the whole transaction, and once the receiver is back
// each event succeeds once.
func TestLargeTransactionInPartsSpills(t *testing.T) {
	t.Parallel()
	const events = 3000
	e := newEnv(t)
	rcv := newReceiver(t)
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	ok := map[int]int{} // event n: 200 answers
	rcv.answer = func(_ int, r *http.Request) int {
		if down.Load() {
			return http.StatusServiceUnavailable
		}
		mu.Lock()
		ok[requestN(r)]++
		mu.Unlock()
		return http.StatusOK
	}
	e.addEndpoint("ep", "acme", rcv)
	e.Exec(`UPDATE relay.endpoints SET breaker_cooldown_ms = 200 WHERE id = 'ep'`)
	r, _ := e.startRelay(func(c *Config) {
		partsOf(c)
		c.QueueEvents = 100
		c.RetrySchedule = slices.Repeat([]time.Duration{100 * time.Millisecond}, 1000)
	})
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'acme', 'x', jsonb_build_object('n', i) FROM generate_series(0, $1 - 1) i`, events)
	e.WaitFor("a row for every event, and the whole transaction acknowledged", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries`) == events && r.wm.pending() == 0
	})
	down.Store(false)
	e.WaitFor("every delivery to succeed", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == events
	})
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != events {
		t.Errorf("%d rows, want %d", got, events)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ok) != events {
		t.Errorf("%d events answered 200, want %d", len(ok), events)
	}
	for n, c := range ok {
		if c != 1 {
			t.Errorf("event %d answered 200 %d times", n, c)
		}
	}
}
