package relay

import (
	"context"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A dead receiver opens its endpoint's breaker after the configured number
// of consecutive failures; while open no attempt is made (and none is
// burned); another tenant's endpoint keeps full speed; after the cooldown
// one probe goes through and, the receiver being back, closes it.
func TestBreakerOpensThenProbeCloses(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dead, fine := newReceiver(t), newReceiver(t)
	var recovered atomic.Bool
	dead.answer = func(int, *http.Request) int {
		if recovered.Load() {
			return 200
		}
		return 500
	}
	e.addEndpoint("fine", "other", fine)
	e.addEndpoint("dead", "t", dead)
	e.Exec(`UPDATE relay.endpoints SET breaker_failures = 3, breaker_cooldown_ms = 400, max_in_flight = 1 WHERE id = 'dead'`)
	e.startRelay(func(c *Config) {
		c.RetrySchedule = []time.Duration{0, 20 * time.Millisecond, 20 * time.Millisecond, 20 * time.Millisecond, 20 * time.Millisecond, 20 * time.Millisecond}
	})
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'x', jsonb_build_object('i', i) FROM generate_series(1, 5) i`)
	e.WaitFor("breaker open", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_health WHERE endpoint_id = 'dead' AND breaker_state = 'open'`) == 1
	})
	if n := len(dead.requests()); n != 3 {
		t.Fatalf("breaker opened after %d attempts, want 3", n)
	}
	// While it is open, another tenant's events flow.
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'other', 'x', jsonb_build_object('i', i) FROM generate_series(1, 200) i`)
	start := time.Now()
	e.WaitFor("other tenant delivered", 20*time.Second, func() bool { return len(fine.requests()) == 200 })
	t.Logf("200 deliveries to a healthy endpoint in %s while the other breaker was open", time.Since(start))
	recovered.Store(true)
	e.WaitFor("all of t's events delivered", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'dead' AND state = 'succeeded'`) == 5
	})
	reqs := dead.requests()
	// The first request after the third failure is the probe: it waits for
	// the cooldown.
	if gap := reqs[3].at.Sub(reqs[2].at); gap < 350*time.Millisecond {
		t.Errorf("probe came %s after the breaker opened, want >= the 400ms cooldown", gap)
	}
	e.WaitFor("breaker closed", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_health WHERE endpoint_id = 'dead' AND breaker_state = 'closed' AND failing_since IS NULL`) == 1
	})
	// Waiting while open burned no attempts: 5 deliveries, 3 failed
	// attempts before the breaker opened, the rest succeeded.
	if n := e.Count(`SELECT coalesce(sum(attempts), 0) FROM relay.deliveries WHERE endpoint_id = 'dead'`); n > 5+3 {
		t.Errorf("%d attempts in total for 5 deliveries and 3 failures: open-circuit waits were counted", n)
	}
}

// 410 Gone is final and disables the endpoint, which then stops routing.
func TestGoneDisablesTheEndpoint(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	gone := newReceiver(t)
	gone.answer = func(int, *http.Request) int { return http.StatusGone }
	e.addEndpoint("gone", "t", gone)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("endpoint disabled", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoints WHERE id = 'gone' AND NOT enabled AND disabled_reason LIKE '%410 Gone%'`) == 1
	})
	e.WaitFor("the failed row", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'failed'`) == 1
	})
	var state, errText string
	var attempts int
	if err := e.Pool.QueryRow(context.Background(), `SELECT state, error, attempts FROM relay.deliveries`).Scan(&state, &errText, &attempts); err != nil {
		t.Fatal(err)
	}
	if state != "failed" || attempts != 1 || !strings.Contains(errText, "410") || !strings.Contains(errText, "disabled") {
		t.Errorf("row: %s after %d attempts, %q; want failed after 1 with the reason", state, attempts, errText)
	}
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{"after": true}')`)
	e.WaitFor("next event unrouted", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'unrouted'`) == 1
	})
	if n := len(gone.requests()); n != 1 {
		t.Errorf("receiver got %d requests, want 1", n)
	}
	// Re-enabling is one UPDATE.
	gone.answer = nil
	e.Exec(`UPDATE relay.endpoints SET enabled = true, disabled_reason = NULL WHERE id = 'gone'`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{"again": true}')`)
	e.WaitFor("delivered after re-enabling", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 1
	})
}

// An endpoint that fails continuously for AutoDisableAfter is disabled,
// and its pending deliveries go to the dead-letter queue with the reason.
func TestAutoDisableAfterContinuousFailure(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	down := newReceiver(t)
	down.answer = func(int, *http.Request) int { return 503 }
	e.addEndpoint("down", "t", down)
	// The breaker opens too (the failure ratio trips it); its probes keep
	// the streak observed.
	e.Exec(`UPDATE relay.endpoints SET breaker_cooldown_ms = 50 WHERE id = 'down'`)
	e.startRelay(func(c *Config) {
		c.AutoDisableAfter = 300 * time.Millisecond
		c.RetrySchedule = []time.Duration{0, 50 * time.Millisecond, 50 * time.Millisecond, 50 * time.Millisecond,
			50 * time.Millisecond, 50 * time.Millisecond, 50 * time.Millisecond, 50 * time.Millisecond, time.Hour}
	})
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'x', jsonb_build_object('i', i) FROM generate_series(1, 10) i`)
	e.WaitFor("endpoint auto-disabled", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoints WHERE id = 'down' AND NOT enabled AND disabled_reason LIKE '%failing continuously%'`) == 1
	})
	e.WaitFor("every delivery dead-lettered", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'dead' AND error LIKE '%failing continuously%'`) == 10
	})
	if n := e.Count(`SELECT count(*) FROM relay.endpoint_health WHERE endpoint_id = 'down' AND failing_since IS NOT NULL`); n != 1 {
		t.Errorf("endpoint_health has no failure streak for the endpoint")
	}
}

// An endpoint limited to 50/s gets 50/s; held-back deliveries do not
// count as attempts; an unlimited endpoint is not slowed.
func TestEndpointRateLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	slow, fast := newReceiver(t), newReceiver(t)
	e.addEndpoint("limited", "t", slow)
	e.addEndpoint("free", "u", fast)
	e.Exec(`UPDATE relay.endpoints SET rate_limit = 50, rate_burst = 5 WHERE id = 'limited'`)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'x', jsonb_build_object('i', i) FROM generate_series(1, 100) i`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'u', 'x', jsonb_build_object('i', i) FROM generate_series(1, 100) i`)
	e.WaitFor("limited endpoint done", 30*time.Second, func() bool { return len(slow.requests()) == 100 })
	reqs := slow.requests()
	span := reqs[len(reqs)-1].at.Sub(reqs[0].at)
	// 5 of burst, then 95 at 50/s: 1.9 s.
	if span < 1800*time.Millisecond || span > 2600*time.Millisecond {
		t.Errorf("100 deliveries at 50/s (burst 5) took %s, want about 1.9s", span)
	}
	fr := fast.requests()
	if fspan := fr[len(fr)-1].at.Sub(fr[0].at); fspan > span/2 {
		t.Errorf("unlimited endpoint took %s, slowed by the other's limit", fspan)
	}
	e.WaitFor("the status rows", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'limited' AND state = 'succeeded'`) == 100
	})
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'limited' AND state = 'succeeded' AND attempts = 1`); n != 100 {
		t.Errorf("%d of 100 limited deliveries succeeded at their first attempt", n)
	}
}

// A tenant limit caps the sum over its endpoints, and a live change to it
// applies at once.
func TestTenantRateLimitCapsTheSum(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, b := newReceiver(t), newReceiver(t)
	e.Exec(`INSERT INTO relay.tenants (id, rate_limit, rate_burst) VALUES ('t', 40, 4)`)
	e.addEndpoint("a", "t", a)
	e.addEndpoint("b", "t", b)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'x', jsonb_build_object('i', i) FROM generate_series(1, 40) i`)
	e.WaitFor("80 deliveries", 30*time.Second, func() bool { return len(a.requests())+len(b.requests()) == 80 })
	first, last := a.requests()[0].at, a.requests()[0].at
	for _, r := range append(a.requests(), b.requests()...) {
		if r.at.Before(first) {
			first = r.at
		}
		if r.at.After(last) {
			last = r.at
		}
	}
	// 80 deliveries over both endpoints at 40/s with burst 4: ~1.9 s.
	if span := last.Sub(first); span < 1700*time.Millisecond {
		t.Errorf("80 deliveries under a 40/s tenant limit took only %s", span)
	}
}

// An endpoint given an attempt budget of millions (keep retrying through
// a long outage) retries like any other: every failure is counted on its
// row, every event ends succeeded once the receiver is back, and the
// retries cost memory per attempt, not per allowed attempt. A relay that
// built the extended schedule on each failure allocated 8 MB per failed
// attempt here (200 failures: 1.6 GB). The breaker opens and probes
// every 10 ms meanwhile, as it would for any dead receiver. Not parallel: it reads the
// process's allocation counter.
func TestHugeAttemptBudgetRetriesInBoundedMemory(t *testing.T) {
	e := newEnv(t)
	rcv := newReceiver(t)
	const events, failures = 20, 200
	rcv.answer = func(n int, _ *http.Request) int {
		if n < failures {
			return 503
		}
		return 200
	}
	e.addEndpoint("ep", "t", rcv)
	e.Exec(`UPDATE relay.endpoints SET max_attempts = 1000000, retry_schedule = '{0s,5ms}', breaker_cooldown_ms = 10 WHERE id = 'ep'`)
	e.startRelay(nil)
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'x', jsonb_build_object('i', i) FROM generate_series(1, $1) i`, events)
	e.WaitFor("every event delivered after the failures", 60*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ep' AND state = 'succeeded'`) == events
	})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	allocated := after.TotalAlloc - before.TotalAlloc
	reqs := len(rcv.requests())
	t.Logf("%d requests (%d answered 503), %.1f MB allocated by the test process meanwhile", reqs, failures, float64(allocated)/1e6)
	if reqs != failures+events {
		t.Errorf("%d requests, want %d failures and %d successes", reqs, failures, events)
	}
	// Exact accounting: one row per event, and its attempts are the
	// requests the receiver saw for it.
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ep'`); n != events {
		t.Errorf("%d rows, want %d", n, events)
	}
	if n := e.Count(`SELECT coalesce(sum(attempts), 0) FROM relay.deliveries WHERE endpoint_id = 'ep'`); n != reqs {
		t.Errorf("attempts on the rows add up to %d, want the %d requests", n, reqs)
	}
	if allocated > 400<<20 {
		t.Errorf("%.0f MB allocated for %d failed attempts, want far less than the 8 MB per attempt a schedule of max_attempts entries costs", float64(allocated)/1e6, failures)
	}
}
