package relay

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/relaytest"
)

// BenchmarkStartupManyEndpoints times a relay with 10,000 endpoints from
// Run to its first delivery: "first" with no endpoint history (a first
// start, which records a snapshot of every endpoint), "restart" with one
// recorded version per endpoint (every later start reads them).
//
//	go test -run '^$' -bench BenchmarkStartupManyEndpoints -benchtime 5x ./relay/
func BenchmarkStartupManyEndpoints(b *testing.B) {
	for _, mode := range []string{"first", "restart"} {
		b.Run(mode, func(b *testing.B) { benchStartup(b, mode == "first", 10000) })
	}
}

func benchStartup(b *testing.B, first bool, endpoints int) {
	e := &env{relaytest.New(b, cluster, "bs")}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	b.Cleanup(srv.Close)
	e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets) SELECT 'ep_m' || g, 't' || (g % 1000), $1, ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']
FROM generate_series(0, $2::int - 1) g`,
		srv.URL+"/hook", endpoints)
	start := func(n int) time.Duration {
		t0 := time.Now()
		_, stop := e.startRelay(func(c *Config) { c.Workers = 64 })
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, endpoint_id) VALUES ('t1', 'x', '{}', 'ep_m1')`)
		e.WaitFor("the event delivered", 30*time.Second, func() bool {
			return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == n
		})
		took := time.Since(t0)
		// Let the watermark reach the slot (and the snapshot its table).
		e.WaitFor("the slot past the event", 30*time.Second, func() bool {
			return e.Count(`SELECT count(*) FROM pg_replication_slots s WHERE s.slot_name = $1
AND s.confirmed_flush_lsn > (SELECT max(commit_lsn) FROM relay.deliveries)`, e.Slot) == 1
		})
		stop()
		return took
	}
	start(1) // creates the slot and, for restart, the history
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		if first {
			b.StopTimer()
			e.Exec(`TRUNCATE relay.endpoint_history`)
			b.StartTimer()
		}
		total += start(i + 2)
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms-to-first-delivery")
}
