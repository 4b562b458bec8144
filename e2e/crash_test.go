package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// 20,000 events from concurrent transactions while the relay is killed
// with SIGKILL at random moments: at the end every event has exactly one
// succeeded row per endpoint, every event arrived, and duplicates are few.
func TestKill9LosesNothing(t *testing.T) {
	const (
		producers = 8
		perTxn    = 5
		events    = 20000
		kills     = 6
	)
	url, pool := database(t)
	a, b := newReceiver(t), newReceiver(t)
	_, err := pool.Exec(context.Background(), `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES
  ('ep_a', 'acme', $1, ARRAY[$2]), ('ep_b', 'acme', $3, ARRAY[$4])`, a.srv.URL, a.secret, b.srv.URL, b.secret)
	if err != nil {
		t.Fatal(err)
	}
	proc := startRelay(t, relayArgs(url)...)

	ctx := context.Background()
	var committed atomic.Int64
	var wg sync.WaitGroup
	var prodErr atomic.Value
	for p := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < events/producers/perTxn; i++ {
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					for j := range perTxn {
						if _, err := tx.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('acme', 'e', $1)`,
							fmt.Sprintf(`{"p": %d, "i": %d, "j": %d}`, p, i, j)); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					prodErr.Store(err)
					return
				}
				committed.Add(perTxn)
				if i%50 == 0 {
					time.Sleep(time.Millisecond) // spread the load over the kills
				}
			}
		}()
	}
	// Kill at random moments while producers run and after.
	var killedAt []kill
	for k := range kills {
		time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond)
		sent := time.Now()
		proc.kill9()
		killedAt = append(killedAt, kill{sent, time.Now()})
		t.Logf("kill -9 #%d after %d events committed", k+1, committed.Load())
		proc = startRelay(t, relayArgs(url)...)
	}
	wg.Wait()
	if err, _ := prodErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	if committed.Load() != events {
		t.Fatalf("committed %d events, want %d", committed.Load(), events)
	}
	waitFor(t, "every delivery to succeed", 3*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 2*events
	})
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != 2*events {
		t.Errorf("%d delivery rows, want exactly %d", n, 2*events)
	}
	if n := count(t, pool, `SELECT count(*) FROM relay.outbox o WHERE
(SELECT count(*) FROM relay.deliveries d WHERE d.event_id = o.id AND d.state = 'succeeded') <> 2`); n != 0 {
		t.Errorf("%d events without exactly one succeeded row per endpoint", n)
	}
	// A kill can repeat only what was in flight: attempts under way (at
	// most --workers, 64) and deliveries whose status row was not yet
	// written (at most one status batch, 2000), across both endpoints.
	const inFlightBound = 64 + 2000
	allDups := 0
	for name, rcv := range map[string]*receiver{"a": a, "b": b} {
		distinct, total, dups, bad := rcv.stats()
		allDups += dups
		if n := rcv.repeatsWithoutKill(killedAt); n != 0 {
			t.Errorf("receiver %s: %d deliveries repeated within one relay process", name, n)
		}
		if distinct != events {
			t.Errorf("receiver %s saw %d distinct events, want %d", name, distinct, events)
		}
		if bad != 0 {
			t.Errorf("receiver %s: %d bad signatures", name, bad)
		}
		t.Logf("receiver %s: %d requests, %d distinct, %d duplicates (%.2f%%, %.0f per kill) after %d kills",
			name, total, distinct, dups, 100*float64(dups)/float64(events), float64(dups)/kills, kills)
	}
	if allDups > kills*inFlightBound {
		t.Errorf("%d duplicates over %d kills: more than what can be in flight at a kill (%d each)", allDups, kills, inFlightBound)
	}
}

// Postgres restarts (and crashes) while the relay runs: it reconnects and
// nothing is lost.
func TestPostgresRestartLosesNothing(t *testing.T) {
	if !cluster.Owned() {
		t.Skip("needs a cluster the test can restart")
	}
	url, pool := database(t)
	rcv := newReceiver(t)
	_, err := pool.Exec(context.Background(), `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`, rcv.srv.URL, rcv.secret)
	if err != nil {
		t.Fatal(err)
	}
	startRelay(t, relayArgs(url)...)
	insert := func(from, to int) {
		for i := from; i < to; i++ {
			for {
				_, err := pool.Exec(context.Background(), `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'e', $1)`, fmt.Sprintf(`{"i": %d}`, i))
				if err == nil {
					break
				}
				time.Sleep(50 * time.Millisecond) // the server is restarting
			}
		}
	}
	succeeded := func() int {
		n := -1
		pool.QueryRow(context.Background(), `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`).Scan(&n)
		return n
	}
	insert(0, 200)
	waitFor(t, "200 succeeded before the restarts", time.Minute, func() bool { return succeeded() == 200 })
	// Restart while the relay streams: once cleanly, once as a crash, with
	// events committed in between.
	if err := cluster.Restart(context.Background(), "fast"); err != nil {
		t.Fatal(err)
	}
	insert(200, 300)
	if err := cluster.Restart(context.Background(), "immediate"); err != nil {
		t.Fatal(err)
	}
	insert(300, 400)
	waitFor(t, "400 succeeded", 2*time.Minute, func() bool { return succeeded() == 400 })
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != 400 {
		t.Errorf("%d delivery rows, want 400", n)
	}
	if distinct, _, _, bad := rcv.stats(); distinct != 400 || bad != 0 {
		t.Errorf("receiver saw %d distinct events (%d bad signatures), want 400", distinct, bad)
	}
}
