package relay

import (
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// While an endpoint's circuit is open, the loader reads back one of its
// pending rows per cooldown, the probe, not a batch that would go back to
// the table when the probe fails. When the receiver recovers, the probe
// closes the circuit and the backlog follows.
func TestOpenCircuitLoadsOneProbeRowAtATime(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	var healthy atomic.Bool
	var requests atomic.Int64
	rcv.answer = func(int, *http.Request) int {
		requests.Add(1)
		if healthy.Load() {
			return 200
		}
		return 503
	}
	e.addEndpoint("ep", "t", rcv)
	e.Exec(`UPDATE relay.endpoints SET breaker_failures = 1, breaker_cooldown_ms = 200, max_attempts = 1000000,
retry_schedule = '{0s,100ms}' WHERE id = 'ep'`)
	r, _ := e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'trip', '{}')`)
	e.WaitFor("circuit open", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_health WHERE endpoint_id = 'ep' AND breaker_state = 'open'`) == 1
	})
	const n = 300
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'backlog', jsonb_build_object('i', i) FROM generate_series(1, $1) i`, n)
	e.WaitFor("the backlog in the table", 10*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state IN ('pending', 'retrying')`) >= n
	})

	// Over 3 s, about 15 cooldowns: a probe each, not 300 rows each.
	loaded0, requests0 := testutil.ToFloat64(r.metrics.loaded), requests.Load()
	time.Sleep(3 * time.Second)
	loaded, reqs := testutil.ToFloat64(r.metrics.loaded)-loaded0, requests.Load()-requests0
	t.Logf("over 3 s with the circuit open: %.0f rows loaded, %d requests", loaded, reqs)
	if loaded > 60 {
		t.Errorf("%.0f rows loaded in 3 s with the circuit open (cooldown 200 ms), want about one per cooldown", loaded)
	}
	if reqs == 0 || reqs > 60 {
		t.Errorf("%d requests in 3 s with the circuit open, want a probe per cooldown", reqs)
	}

	healthy.Store(true)
	e.WaitFor("the backlog delivered", 30*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n+1
	})
}
