package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// eventN reads the "n" of a test payload.
func eventN(t *testing.T, body []byte) int {
	t.Helper()
	var p struct{ N *int }
	if err := json.Unmarshal(body, &p); err != nil || p.N == nil {
		t.Errorf("payload %q has no n", body)
		return -1
	}
	return *p.N
}

func requestN(r *http.Request) int {
	body, _ := io.ReadAll(r.Body)
	var p struct{ N int }
	json.Unmarshal(body, &p)
	return p.N
}

// publishInOrder commits events n = from, from+1, ... for tenant, one
// transaction per entry of sizes, one INSERT per row, from one connection:
// commit order is n's order, and within a transaction insert order is too.
func (e *env) publishInOrder(tenant string, from int, sizes ...int) int {
	e.T.Helper()
	ctx := context.Background()
	n := from
	for _, size := range sizes {
		err := pgx.BeginFunc(ctx, e.Pool, func(tx pgx.Tx) error {
			for range size {
				if _, err := tx.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ($1, 'x', $2)`,
					tenant, fmt.Sprintf(`{"n": %d}`, n)); err != nil {
					return err
				}
				n++
			}
			return nil
		})
		if err != nil {
			e.T.Fatal(err)
		}
	}
	return n
}

// txnSizes returns transaction sizes 1..7 (cycling) adding up to total.
func txnSizes(total int) []int {
	var out []int
	for i := 0; total > 0; i++ {
		s := min(total, []int{1, 3, 7, 2, 5, 1, 4}[i%7])
		out = append(out, s)
		total -= s
	}
	return out
}

// firstArrivals lists the events in the order they first reached rcv,
// with the time of each one's first and last request.
func firstArrivals(t *testing.T, rcv *receiver) (order []int, first, last map[int]time.Time) {
	t.Helper()
	first, last = map[int]time.Time{}, map[int]time.Time{}
	for _, req := range rcv.requests() {
		n := eventN(t, req.body)
		if _, seen := first[n]; !seen {
			first[n] = req.at
			order = append(order, n)
		}
		last[n] = req.at
	}
	return order, first, last
}

func upTo(from, to int) []int {
	var out []int
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

// The table's order key (commit_lsn, event_seq) lists the endpoint's
// deliveries in commit order.
func (e *env) checkOrderKey(endpoint string, want []int) {
	e.T.Helper()
	rows, err := e.Pool.Query(context.Background(), `SELECT (o.payload->>'n')::int FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id
WHERE d.endpoint_id = $1 ORDER BY d.commit_lsn, d.event_seq`, endpoint)
	if err != nil {
		e.T.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		e.T.Fatal(err)
	}
	if !slices.Equal(got, want) {
		e.T.Errorf("relay.deliveries ordered by (commit_lsn, event_seq) is not commit order: %v", got)
	}
}

// An ordered endpoint gets every event in commit order (rows of one
// transaction in insert order), one request at a time, through a run of
// failures of its head during which nothing behind the head is attempted;
// meanwhile another tenant's ordinary endpoint gets all of its events.
func TestOrderedEndpointKeepsCommitOrderThroughFailures(t *testing.T) {
	t.Parallel()
	const events, failAt, others = 300, 100, 200
	e := newEnv(t)
	ord, other := newReceiver(t), newReceiver(t)
	var failing, otherDone atomic.Bool
	var failures atomic.Int32
	ord.answer = func(_ int, r *http.Request) int {
		time.Sleep(time.Millisecond) // so that overlapping requests would show in the peak
		// The run lasts until the other tenant got everything, and for at
		// least 8 attempts (the breaker opens after 5).
		if requestN(r) == failAt && (!otherDone.Load() || failures.Load() < 8) {
			failing.Store(true)
			failures.Add(1)
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	e.addEndpoint("ord", "acme", ord)
	e.addEndpoint("other", "globex", other)
	// Enough attempts for a long run of failures; the breaker opens after
	// five of them and probes every 150ms.
	e.Exec(`UPDATE relay.endpoints SET ordered = true, retry_schedule = '{0s,20ms,50ms,100ms}', max_attempts = 200,
breaker_cooldown_ms = 150 WHERE id = 'ord'`)
	e.startRelay(nil) // 8 workers, max_in_flight 64

	e.publishInOrder("acme", 0, txnSizes(events)...)
	e.WaitFor("the head to fail", 20*time.Second, failing.Load)
	// While the ordered endpoint's head fails, another tenant flows.
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'globex', 'x', jsonb_build_object('n', i) FROM generate_series(0, $1 - 1) i`, others)
	e.WaitFor("the other tenant's events during the failures", 20*time.Second, func() bool { return len(other.requests()) >= others })
	otherDone.Store(true)

	e.WaitFor("every ordered delivery to succeed", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'succeeded'`) == events
	})
	order, _, _ := firstArrivals(t, ord)
	if !slices.Equal(order, upTo(0, events)) {
		t.Errorf("first arrivals are not commit order: %v", order)
	}
	if p := ord.peak.Load(); p != 1 {
		t.Errorf("the ordered receiver saw %d requests at once, want 1", p)
	}
	// From the head's first failure to its success, only the head came.
	reqs := ord.requests()
	start := slices.IndexFunc(reqs, func(r received) bool { return eventN(t, r.body) == failAt })
	for _, r := range reqs[start : start+int(failures.Load())+1] {
		if n := eventN(t, r.body); n != failAt {
			t.Errorf("event %d was attempted while the head %d was failing", n, failAt)
		}
	}
	n := int(failures.Load())
	t.Logf("head failed %d times while the other tenant got %d events", n, others)
	if n < 8 {
		t.Errorf("the head failed %d times, want a run of at least 8", n)
	}
	_, _, lastOrd := firstArrivals(t, ord)
	otherReqs := other.requests()
	if end := otherReqs[len(otherReqs)-1].at; !end.Before(lastOrd[failAt]) {
		t.Errorf("the other tenant's last event came at %s, after the ordered head recovered (%s)", end, lastOrd[failAt])
	}
	if got := e.Count(`SELECT attempts FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id
WHERE d.endpoint_id = 'ord' AND (o.payload->>'n')::int = $1`, failAt); got != n+1 {
		t.Errorf("the head's row says %d attempts, the receiver saw %d", got, n+1)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord'`); got != events {
		t.Errorf("%d rows for the ordered endpoint, want %d", got, events)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE next_attempt_at IS NOT NULL`); got != 0 {
		t.Errorf("%d succeeded rows still say when to attempt them next", got)
	}
	e.checkOrderKey("ord", upTo(0, events))
}

// A head that is dead-lettered (attempts exhausted, or a final 4xx) ends
// in relay.dead_letters and the endpoint moves on to the next delivery,
// in order. Replaying it later delivers it then: after the ones that came
// after it.
func TestOrderedDeadHeadMovesOn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	var replayed atomic.Bool
	rcv.answer = func(_ int, r *http.Request) int {
		switch requestN(r) {
		case 3:
			if !replayed.Load() {
				return http.StatusInternalServerError
			}
		case 6:
			return http.StatusBadRequest
		}
		return http.StatusOK
	}
	e.addEndpoint("ord", "t", rcv)
	e.Exec(`UPDATE relay.endpoints SET ordered = true, retry_schedule = '{0s,30ms}', max_attempts = 2 WHERE id = 'ord'`)
	e.startRelay(nil)
	e.publishInOrder("t", 0, 4, 6)
	e.WaitFor("10 final rows", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state IN ('succeeded', 'dead', 'failed')`) == 10
	})
	order, first, last := firstArrivals(t, rcv)
	if !slices.Equal(order, upTo(0, 10)) {
		t.Errorf("first arrivals are not commit order: %v", order)
	}
	if !first[4].After(last[3]) {
		t.Errorf("event 4 first came at %s, before the dead head's last attempt at %s", first[4], last[3])
	}
	if !first[7].After(last[6]) {
		t.Errorf("event 7 first came before the failed event 6 was answered")
	}
	if p := rcv.peak.Load(); p != 1 {
		t.Errorf("%d requests at once, want 1", p)
	}
	type dl struct {
		n             int
		state, reason string
		attempts      int
	}
	rows, err := e.Pool.Query(context.Background(), `SELECT (payload->>'n')::int, state, reason, attempts FROM relay.dead_letters
WHERE endpoint_id = 'ord' ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dl, error) {
		var d dl
		return d, row.Scan(&d.n, &d.state, &d.reason, &d.attempts)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 2 || dead[0].n != 3 || dead[0].state != "dead" || dead[0].attempts != 2 ||
		dead[1].n != 6 || dead[1].state != "failed" || dead[1].attempts != 1 {
		t.Fatalf("dead letters: %+v; want event 3 dead after 2 attempts and event 6 failed after 1", dead)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'succeeded'`); n != 8 {
		t.Errorf("%d succeeded, want 8", n)
	}

	// Replay: the dead letter is delivered now, after event 9.
	replayed.Store(true)
	e.Exec(`SELECT relay.replay_dead_letter(event_id, 'ord') FROM relay.dead_letters WHERE endpoint_id = 'ord' AND (payload->>'n')::int = 3`)
	e.WaitFor("the replayed delivery", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'succeeded'`) == 9
	})
	_, _, last = firstArrivals(t, rcv)
	if !last[3].After(last[9]) {
		t.Errorf("the replayed event 3 came at %s, not after event 9 (%s)", last[3], last[9])
	}
}

// A head that keeps failing holds neither the WAL nor its backlog in
// memory: the deliveries behind it are pending rows from the start, so
// the slot's confirmed position passes them, under spill and block alike;
// they follow in order once the head gets through.
func TestOrderedFailingHeadDoesNotHoldTheWAL(t *testing.T) {
	t.Parallel()
	for _, overflow := range []Overflow{OverflowSpill, OverflowBlock} {
		t.Run(string(overflow), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			rcv := newReceiver(t)
			var release atomic.Bool
			rcv.answer = func(_ int, r *http.Request) int {
				if requestN(r) == 0 && !release.Load() {
					return http.StatusServiceUnavailable
				}
				return http.StatusOK
			}
			e.addEndpoint("ord", "t", rcv)
			e.Exec(`UPDATE relay.endpoints SET ordered = true, retry_schedule = '{0s,100ms}', max_attempts = 1000,
breaker_cooldown_ms = 200 WHERE id = 'ord'`)
			r, _ := e.startRelay(func(c *Config) { c.Overflow = overflow; c.QueueEvents = 50 })
			const events = 400 // eight times the queue
			e.publishInOrder("t", 0, txnSizes(events)...)
			e.WaitFor("the slot to confirm every event while the head fails", 20*time.Second, func() bool {
				return e.Count(`SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn >
(SELECT max(commit_lsn) FROM relay.deliveries WHERE endpoint_id = 'ord')`, e.Slot) == 1 &&
					e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord'`) == events &&
					e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'retrying'`) == 1
			})
			if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'pending'`); n != events-1 {
				t.Errorf("%d pending rows behind the failing head, want %d", n, events-1)
			}
			if order, _, _ := firstArrivals(t, rcv); !slices.Equal(order, []int{0}) {
				t.Errorf("events attempted behind the failing head: %v", order)
			}
			if n, _ := r.sched.len(); n > 50 {
				t.Errorf("%d deliveries in memory while the head waits", n)
			}
			release.Store(true)
			e.WaitFor("every delivery to succeed", 30*time.Second, func() bool {
				return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ord' AND state = 'succeeded'`) == events
			})
			if order, _, _ := firstArrivals(t, rcv); !slices.Equal(order, upTo(0, events)) {
				t.Errorf("first arrivals are not commit order: %v", order)
			}
			if p := rcv.peak.Load(); p != 1 {
				t.Errorf("%d requests at once, want 1", p)
			}
		})
	}
}

// Turning ordered on live: what was queued joins the order, every event
// committed after the change comes after all of those, one at a time and
// in commit order. Turning it off: concurrency comes back and nothing is
// left behind.
func TestOrderedSwitchedLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	var phase atomic.Int32 // 1: from the first event committed after the switch on; 2: from the switch off
	var peakOn, peakOff, active atomic.Int32
	track := func(p *atomic.Int32) func() {
		now := active.Add(1)
		for old := p.Load(); now > old && !p.CompareAndSwap(old, now); old = p.Load() {
		}
		return func() { active.Add(-1) }
	}
	rcv.answer = func(_ int, r *http.Request) int {
		if requestN(r) >= 200 {
			phase.CompareAndSwap(0, 1)
		}
		switch phase.Load() {
		case 1:
			defer track(&peakOn)()
		case 2:
			defer track(&peakOff)()
		}
		time.Sleep(5 * time.Millisecond)
		return http.StatusOK
	}
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(nil)
	e.publishInOrder("t", 0, slices.Repeat([]int{10}, 20)...) // 0..199
	e.WaitFor("some deliveries", 20*time.Second, func() bool { return len(rcv.requests()) >= 20 })
	peakBefore := rcv.peak.Load()
	e.Exec(`UPDATE relay.endpoints SET ordered = true WHERE id = 'ep'`)
	e.publishInOrder("t", 200, slices.Repeat([]int{5}, 20)...) // 200..299
	e.WaitFor("300 succeeded", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 300
	})
	order, first, _ := firstArrivals(t, rcv)
	var lastPre time.Time
	for n := range 200 {
		if first[n].After(lastPre) {
			lastPre = first[n]
		}
	}
	for n := 200; n < 300; n++ {
		if !first[n].After(lastPre) {
			t.Errorf("event %d, committed after the switch, came before an event queued before it", n)
			break
		}
	}
	if post := slices.DeleteFunc(slices.Clone(order), func(n int) bool { return n < 200 }); !slices.Equal(post, upTo(200, 300)) {
		t.Errorf("events after the switch came out of order: %v", post)
	}
	if peakBefore < 2 {
		t.Errorf("before the switch the receiver saw at most %d requests at once; the test needs concurrency to mean anything", peakBefore)
	}
	if p := peakOn.Load(); p != 1 {
		t.Errorf("after the switch, %d requests at once, want 1", p)
	}

	// A backlog in the lane (100 events at 5ms each), then ordered off.
	e.publishInOrder("t", 300, slices.Repeat([]int{25}, 4)...) // 300..399
	e.Exec(`UPDATE relay.endpoints SET ordered = false WHERE id = 'ep'`)
	phase.Store(2)
	e.WaitFor("400 succeeded", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 400
	})
	if p := peakOff.Load(); p < 2 {
		t.Errorf("after turning ordered off with a backlog, at most %d requests at once", p)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries`); n != 400 {
		t.Errorf("%d rows, want 400", n)
	}
}

// After a crash the table can hold a newer delivery's row while an older
// one's row was lost with the writer's buffer (its event is streamed
// again): the ordered endpoint must wait for the replay before it reads
// its rows, or the newer one would overtake.
func TestOrderedRestartWaitsForTheReplay(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	// The state a crash leaves: publication and slot from before the events.
	e.Exec(`CREATE PUBLICATION ` + e.Slot + ` FOR TABLE relay.outbox, relay.endpoints, relay.tenants WITH (publish = 'insert, update, delete')`)
	e.Exec(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, e.Slot)
	e.addEndpoint("ord", "t", rcv)
	e.Exec(`UPDATE relay.endpoints SET ordered = true WHERE id = 'ord'`)
	e.publishInOrder("t", 0, 1) // event 0: its row was lost
	ctx := context.Background()
	err := pgx.BeginFunc(ctx, e.Pool, func(tx pgx.Tx) error { // event 1: its pending row is durable
		_, err := tx.Exec(ctx, `WITH ev AS (
    INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{"n": 1}') RETURNING id, payload)
INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, next_attempt_at, commit_lsn, event_seq, payload)
SELECT id, 'ord', 't', 'x', 'pending', now(), pg_current_wal_lsn(), 0, payload FROM ev`)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	e.Exec(`INSERT INTO relay.relay_state (slot_name, recorded_lsn) VALUES ($1, pg_current_wal_lsn())`, e.Slot)
	e.startRelay(nil)
	e.publishInOrder("t", 2, 3, 3)
	e.WaitFor("8 succeeded", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 8
	})
	if order, _, _ := firstArrivals(t, rcv); !slices.Equal(order, upTo(0, 8)) {
		t.Errorf("first arrivals after the restart: %v, want commit order", order)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries`); n != 8 {
		t.Errorf("%d rows, want 8", n)
	}
}
