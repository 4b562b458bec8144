package e2e

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Three relays on one database: exactly one streams, the others stand by;
// when the active one is killed with SIGKILL another takes over within
// 10 s, and nothing is lost.
func TestStandbyTakeover(t *testing.T) {
	const events = 3000
	url, pool := database(t)
	rcv := newReceiver(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`, rcv.srv.URL, rcv.secret); err != nil {
		t.Fatal(err)
	}
	addrs := make([]string, 3)
	procs := make([]*relayProc, 3)
	for i := range procs {
		addrs[i] = freeAddr(t)
		procs[i] = startRelay(t, relayArgs(url, "--http-addr", addrs[i])...)
	}
	states := func() (active []int, standby int) {
		for i, a := range addrs {
			if procs[i] == nil {
				continue
			}
			code, body := get(a, "/readyz")
			switch {
			case code == 200 && body == "streaming":
				active = append(active, i)
			case code == 200 && len(body) >= 7 && body[:7] == "standby":
				standby++
			}
		}
		return active, standby
	}
	waitFor(t, "one active and two standbys", 30*time.Second, func() bool {
		a, s := states()
		return len(a) == 1 && s == 2
	})

	var inserted atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range events {
			if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'e', $1)`, fmt.Sprintf(`{"i": %d}`, i)); err != nil {
				t.Error(err)
				return
			}
			inserted.Add(1)
			if i%10 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}()
	waitFor(t, "some deliveries", 30*time.Second, func() bool { d, _, _, _ := rcv.stats(); return d > 300 })
	active, _ := states()
	victim := active[0]
	procs[victim].kill9()
	killed := time.Now()
	procs[victim] = nil
	t.Logf("killed the active relay after %d events were inserted", inserted.Load())
	waitFor(t, "a standby to take over", 15*time.Second, func() bool {
		a, s := states()
		return len(a) == 1 && s == 1
	})
	takeover := time.Since(killed)
	t.Logf("standby took over in %s", takeover)
	if takeover > 10*time.Second {
		t.Errorf("takeover took %s, want <= 10s", takeover)
	}
	wg.Wait()
	waitFor(t, "every event delivered", 2*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == events
	})
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != events {
		t.Errorf("%d rows, want %d", n, events)
	}
	distinct, total, dups, bad := rcv.stats()
	if distinct != events || bad != 0 {
		t.Errorf("receiver saw %d distinct events (%d bad signatures), want %d", distinct, bad, events)
	}
	t.Logf("%d requests, %d duplicates", total, dups)
}
