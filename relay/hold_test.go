package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// holdSetup has tenant A's endpoint answer slowly and tenant B's at
// once, with queues far smaller than A's backlog.
func holdSetup(t *testing.T, slow func() time.Duration) (*env, *receiver, *receiver) {
	t.Helper()
	e := newEnv(t)
	rcvA, rcvB := newReceiver(t), newReceiver(t)
	rcvA.answer = func(int, *http.Request) int {
		time.Sleep(slow())
		return 200
	}
	e.addEndpoint("ep_a", "ta", rcvA)
	e.addEndpoint("ep_b", "tb", rcvB)
	return e, rcvA, rcvB
}

// smallQueues makes the queues far smaller than the tests' backlogs, with
// room to hold all of them.
func smallQueues(events, inFlight int) func(*Config) {
	return func(c *Config) {
		c.QueueEvents = events
		c.HeldEvents = 5000
		c.EndpointMaxInFlight = inFlight
	}
}

// insertBacklog commits a few events of tenant B, then n events of
// tenant A in txns transactions, then more of B: both endpoints are busy
// when A's fill the queues.
func (e *env) insertBacklog(n, txns int) {
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'tb', 'b', jsonb_build_object('b', -j) FROM generate_series(1, 10) j`)
	for k := range txns {
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, headers, traceparent)
SELECT 'ta', 'held', jsonb_build_object('i', i, 'text', 'ünïcode ' || i), jsonb_build_object('X-Seq', i::text),
       '00-0af7651916cd43dd8448eb211c80319c-' || lpad(to_hex(i), 16, '0') || '-01'
FROM generate_series($1::int, $2::int) i`, k*n/txns+1, (k+1)*n/txns)
	}
	for i := range 4 {
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'tb', 'b', jsonb_build_object('b', $1 * 10 + j) FROM generate_series(1, 10) j`, i)
	}
}

// insertSpread commits n events of tenant in txns transactions of equal
// size (30 of 200: batches larger than the tests' queues).
func (e *env) insertSpread(tenant string, n, txns int) {
	for k := range txns {
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT $1, 'spread', jsonb_build_object('i', i) FROM generate_series($2::int, $3::int) i`, tenant, k*n/txns+1, (k+1)*n/txns)
	}
}

// checkArrivals checks that every one of A's n events reached rcv intact,
// and returns how many arrived more than once.
func checkArrivals(t *testing.T, rcv *receiver, n int) (dups int) {
	t.Helper()
	seen := map[int]bool{}
	for _, req := range rcv.requests() {
		var body struct {
			I    int    `json:"i"`
			Text string `json:"text"`
		}
		if err := json.Unmarshal(req.body, &body); err != nil {
			t.Fatalf("body %q: %v", req.body, err)
		}
		if req.verifyErr != nil {
			t.Errorf("event %d: signature does not verify: %v", body.I, req.verifyErr)
		}
		if body.Text != fmt.Sprintf("ünïcode %d", body.I) || req.header.Get("X-Seq") != fmt.Sprint(body.I) ||
			req.header.Get("traceparent") != fmt.Sprintf("00-0af7651916cd43dd8448eb211c80319c-%016x-01", body.I) {
			t.Errorf("event %d arrived altered: body %q, X-Seq %q, traceparent %q", body.I, req.body, req.header.Get("X-Seq"), req.header.Get("traceparent"))
		}
		if seen[body.I] {
			dups++
		}
		seen[body.I] = true
	}
	if len(seen) != n {
		t.Errorf("%d of A's %d events arrived", len(seen), n)
	}
	return dups
}

// A backlog far past the queues, for one endpoint while another is busy,
// waits in memory without its payloads: nothing is spilled or loaded
// back, each delivery is attempted once, and payload, headers and
// traceparent (read back from the outbox) arrive intact.
func TestHeldBacklogIsNotSpilled(t *testing.T) {
	t.Parallel()
	e, rcvA, rcvB := holdSetup(t, func() time.Duration { return 2 * time.Millisecond })
	r, _ := e.startRelay(smallQueues(200, 4))
	const n = 2000
	e.insertBacklog(n, 1)
	e.WaitFor("all delivered", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n+50
	})
	if dups := checkArrivals(t, rcvA, n); dups != 0 {
		t.Errorf("%d of A's events arrived twice; a held delivery is attempted once", dups)
	}
	if got := len(rcvB.requests()); got != 50 {
		t.Errorf("B's receiver saw %d requests, want 50", got)
	}
	_, held := r.sched.heldCount()
	spilled, loaded := testutil.ToFloat64(r.metrics.spilled), testutil.ToFloat64(r.metrics.loaded)
	t.Logf("held %d, spilled %v, loaded %v", held, spilled, loaded)
	if held < n/2 {
		t.Errorf("%d deliveries were held; the queues (200) cannot have taken most of A's %d", held, n)
	}
	if spilled != 0 || loaded != 0 {
		t.Errorf("spilled %v and loaded %v: a backlog that drains within HoldFor is not written twice", spilled, loaded)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE attempts <> 1`); got != 0 {
		t.Errorf("%d rows with attempts other than 1", got)
	}
}

// A delivery held longer than HoldFor spills as a pending row, so the
// acknowledgement watermark can move past it, and is loaded back and
// delivered once.
func TestHeldTooLongSpills(t *testing.T) {
	t.Parallel()
	e, rcvA, _ := holdSetup(t, func() time.Duration { return 5 * time.Millisecond })
	r, _ := e.startRelay(func(c *Config) {
		c.QueueEvents = 100
		c.EndpointMaxInFlight = 2
		c.HoldFor = 200 * time.Millisecond
	})
	const n = 1000
	e.insertBacklog(n, 1)
	e.WaitFor("all delivered", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n+50
	})
	if dups := checkArrivals(t, rcvA, n); dups != 0 {
		t.Errorf("%d of A's events arrived twice", dups)
	}
	_, held := r.sched.heldCount()
	spilled, loaded := testutil.ToFloat64(r.metrics.spilled), testutil.ToFloat64(r.metrics.loaded)
	t.Logf("held %d, spilled %v, loaded %v", held, spilled, loaded)
	if held == 0 || spilled < n/2 || loaded != spilled {
		t.Errorf("held %d, spilled %v, loaded %v: want most of A's %d held, then spilled after 200ms and all loaded back", held, spilled, loaded, n)
	}
}

// A relay stopped while deliveries are held has no row for them, and the
// watermark never passed them: the next relay reads them again from the
// slot and delivers every one.
func TestHeldDeliveriesSurviveARestart(t *testing.T) {
	t.Parallel()
	var slow atomic.Int64
	slow.Store(int64(20 * time.Millisecond))
	e, rcvA, _ := holdSetup(t, func() time.Duration { return time.Duration(slow.Load()) })
	mod := smallQueues(100, 2)
	r1, stop1 := e.startRelay(mod)
	const n = 1000
	e.insertBacklog(n, 50)
	e.WaitFor("deliveries held", 20*time.Second, func() bool { held, _ := r1.sched.heldCount(); return held > n/2 })
	stop1()
	rows := e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta'`)
	if rows > n/2 {
		t.Fatalf("%d of A's %d deliveries have rows after the stop; most were held", rows, n)
	}
	slow.Store(int64(time.Millisecond))
	r2, _ := e.startRelay(mod)
	e.WaitFor("all delivered", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded' AND tenant_id = 'ta'`) == n
	})
	dups := checkArrivals(t, rcvA, n)
	t.Logf("rows at the stop %d, duplicates %d, restart skipped %v", rows, dups, testutil.ToFloat64(r2.metrics.restartSkipped))
	if dups > 2*2 { // at most what was in flight at the stop, per relay
		t.Errorf("%d duplicates; only deliveries in flight at the stop may arrive twice", dups)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state <> 'succeeded'`); got != 0 {
		t.Errorf("%d of A's rows are not succeeded", got)
	}
}

// Held deliveries of an endpoint that is disabled end like its queued
// ones: each gets one final row that says why, none is lost.
func TestHeldDeliveriesOfADisabledEndpoint(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	e, rcvA, _ := holdSetup(t, func() time.Duration { <-release; return 0 })
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open) // before the receiver closes, which waits for its handlers
	r, _ := e.startRelay(smallQueues(100, 2))
	const n = 1000
	e.insertBacklog(n, 1)
	e.WaitFor("deliveries held", 20*time.Second, func() bool { held, _ := r.sched.heldCount(); return held > n/2 })
	e.Exec(`UPDATE relay.endpoints SET enabled = false WHERE id = 'ep_a'`)
	e.WaitFor("nothing held", 20*time.Second, func() bool { held, _ := r.sched.heldCount(); return held == 0 })
	open()
	e.WaitFor("every A delivery final", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state NOT IN ('pending', 'retrying')`) == n
	})
	delivered := e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state = 'succeeded'`)
	refused := e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state = 'rejected' AND error = 'endpoint ep_a is disabled'`)
	t.Logf("delivered %d, refused %d", delivered, refused)
	if delivered+refused != n || delivered > 10 {
		t.Errorf("delivered %d and refused %d of %d: all but those in flight should be refused, saying why", delivered, refused, n)
	}
	if got := len(rcvA.requests()); got != delivered {
		t.Errorf("A's receiver saw %d requests, %d rows say succeeded", got, delivered)
	}
}

// The relay's database connections dropping while deliveries are held
// (the payload reads and the status writes fail and are retried) loses
// none and sends none twice.
func TestHeldDeliveriesSurviveLostConnections(t *testing.T) {
	t.Parallel()
	e, rcvA, _ := holdSetup(t, func() time.Duration { return 3 * time.Millisecond })
	r, _ := e.startRelay(smallQueues(100, 2))
	const n = 1000
	e.insertBacklog(n, 1)
	e.WaitFor("deliveries held", 20*time.Second, func() bool { held, _ := r.sched.heldCount(); return held > n/2 })
	kills := 0
	for range 15 {
		kills += e.Count(`SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND application_name = 'outbox-relay' AND pid <> pg_backend_pid()) k`)
		time.Sleep(100 * time.Millisecond)
	}
	e.WaitFor("all delivered", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n+50
	})
	t.Logf("terminated %d relay connections", kills)
	if kills == 0 {
		t.Fatal("no relay connection was terminated: the test did not test anything")
	}
	if dups := checkArrivals(t, rcvA, n); dups != 0 {
		t.Errorf("%d of A's events arrived twice", dups)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != n+50 {
		t.Errorf("%d rows, want %d", got, n+50)
	}
}

// A held delivery whose outbox row is deleted before its payload is read
// back ends dead, saying why; the others are delivered.
func TestHeldDeliveryWhoseOutboxRowIsGone(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	e, rcvA, _ := holdSetup(t, func() time.Duration { <-release; return 0 })
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	r, _ := e.startRelay(smallQueues(100, 2))
	const n = 1000
	e.insertBacklog(n, 1)
	e.WaitFor("deliveries held", 20*time.Second, func() bool { held, _ := r.sched.heldCount(); return held > n/2 })
	var gone string
	if err := e.Pool.QueryRow(context.Background(), `DELETE FROM relay.outbox WHERE tenant_id = 'ta' AND (payload->>'i')::int = $1 RETURNING id::text`, n).Scan(&gone); err != nil {
		t.Fatal(err)
	}
	open()
	e.WaitFor("every A delivery final", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state NOT IN ('pending', 'retrying')`) == n
	})
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_id = $1::uuid AND state = 'dead' AND error LIKE '%outbox row%deleted%'`, gone); got != 1 {
		t.Errorf("the held delivery whose outbox row was deleted is not dead with the reason")
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'ta' AND state = 'succeeded'`); got != n-1 {
		t.Errorf("%d of A's other %d deliveries succeeded", got, n-1)
	}
	if got := len(rcvA.requests()); got != n-1 {
		t.Errorf("A's receiver saw %d requests, want %d", got, n-1)
	}
}

// An event for an idle endpoint that arrives while another endpoint's
// backlog, read from the WAL longer ago than recentWindow, still fills
// the queues is queued at once, not after the backlog's next delivery
// or spillAfter.
func TestNewEndpointBehindAnOldBacklogIsNotDelayed(t *testing.T) {
	t.Parallel()
	e, rcvA, rcvB := holdSetup(t, func() time.Duration { return 3 * time.Second })
	r, _ := e.startRelay(smallQueues(50, 1))
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'ta', 'held', jsonb_build_object('i', i) FROM generate_series(1, 200) i`)
	e.WaitFor("A's backlog read and its first delivery made", 30*time.Second, func() bool {
		count, _ := r.sched.len()
		return len(rcvA.requests()) > 0 && count >= 49
	})
	time.Sleep(recentWindow + time.Second) // A is no longer "routed lately"; its queue is still full
	for i := range 5 {
		sent := time.Now()
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('tb', 'b', jsonb_build_object('b', $1::int))`, i)
		e.WaitFor("B's event delivered", 10*time.Second, func() bool { return len(rcvB.requests()) == i+1 })
		if took := rcvB.requests()[i].at.Sub(sent); took > 300*time.Millisecond {
			t.Errorf("B's event %d took %s to arrive behind A's full queue, want under 300ms", i, took.Round(time.Millisecond))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A lone endpoint's backlog far past the queues waits in the WAL for its
// own workers: none of it is held or spilled. The workers free room
// while the reader retries, so the queue is often one or two short of
// its bound when the reader asks whether the batch's endpoint is under
// its share; that must not count as under (it once sent the rest of the
// batch to be spilled, a few thousand events per 200,000 drained).
func TestLoneBacklogIsNeitherHeldNorSpilled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep_lone", "tl", rcv)
	r, _ := e.startRelay(smallQueues(100, 8))
	const n = 6000
	e.insertSpread("tl", n, 30)
	e.WaitFor("all delivered", 90*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n
	})
	_, held := r.sched.heldCount()
	spilled, loaded := testutil.ToFloat64(r.metrics.spilled), testutil.ToFloat64(r.metrics.loaded)
	if held != 0 || spilled != 0 || loaded != 0 {
		t.Errorf("held %d, spilled %v, loaded %v of a lone endpoint's backlog; want none: it drains from the WAL", held, spilled, loaded)
	}
	if got := len(rcv.requests()); got != n {
		t.Errorf("receiver saw %d requests, want %d", got, n)
	}
}

// The same beside a rate-limited endpoint whose few queued deliveries
// were routed long ago (more than recentWindow): the backlog fills the
// queues and is the only endpoint busy, so it waits for its own workers
// instead of having its excess held or spilled for being far above the
// other's few.
func TestBacklogBesideAnOldTrickleIsNeitherHeldNorSpilled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcvU, rcvS := newReceiver(t), newReceiver(t)
	e.addEndpoint("ep_u", "tu", rcvU)
	e.addEndpoint("ep_s", "ts", rcvS)
	e.Exec(`UPDATE relay.endpoints SET rate_limit = 1, rate_burst = 1 WHERE id = 'ep_s'`)
	r, _ := e.startRelay(smallQueues(100, 8))
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'ts', 's', jsonb_build_object('s', i) FROM generate_series(1, 20) i`)
	e.WaitFor("S's trickle started", 30*time.Second, func() bool { return len(rcvS.requests()) > 0 })
	time.Sleep(recentWindow + time.Second) // S is no longer "routed lately"; a dozen of its deliveries are still queued
	const n = 6000
	e.insertSpread("tu", n, 30)
	e.WaitFor("U's backlog delivered", 90*time.Second, func() bool { return len(rcvU.requests()) >= n })
	_, held := r.sched.heldCount()
	spilled := testutil.ToFloat64(r.metrics.spilled)
	if len(rcvS.requests()) >= 20 {
		t.Fatalf("S's limited deliveries all arrived before U's backlog was through (%d): the test did not have both queued", len(rcvS.requests()))
	}
	if held != 0 || spilled != 0 {
		t.Errorf("held %d, spilled %v while one endpoint's backlog drained beside an old trickle; want none", held, spilled)
	}
}
