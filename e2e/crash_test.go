package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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

// A Postgres that stops answering without closing anything (every server
// process stopped, as a paused VM or a stalled disk leaves it; its kernel
// still acknowledges every packet) for longer than the stream's receive
// timeout: the relay says so, reconnects once the server answers again,
// and loses nothing. A producer keeps inserting throughout (its inserts
// wait for the server too). Before the stream's receive timeout and the
// connect timeout the relay waited on the old connection without a word.
func TestFrozenPostgresLosesNothing(t *testing.T) {
	if !cluster.Owned() {
		t.Skip("needs a cluster the test can stop")
	}
	url, pool := database(t)
	rcv := newReceiver(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`, rcv.srv.URL, rcv.secret); err != nil {
		t.Fatal(err)
	}
	p := startRelay(t, relayArgs(url)...)
	succeeded := func() int {
		n := -1
		pool.QueryRow(ctx, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`).Scan(&n)
		return n
	}
	var inserted atomic.Int64
	stop := make(chan struct{})
	producer := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				producer <- nil
				return
			default:
			}
			if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'e', $1)`, fmt.Sprintf(`{"i": %d}`, i)); err != nil {
				producer <- err
				return
			}
			inserted.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	waitFor(t, "100 succeeded before the freeze", time.Minute, func() bool { return succeeded() >= 100 })
	thaw := freezeCluster(t)
	time.Sleep(35 * time.Second) // past the stream's 30 s receive timeout
	frozen := inserted.Load()
	thaw()
	waitFor(t, "inserts after the thaw", time.Minute, func() bool { return inserted.Load() >= frozen+100 })
	close(stop)
	if err := <-producer; err != nil {
		t.Fatalf("producer: %v", err)
	}
	n := int(inserted.Load())
	waitFor(t, fmt.Sprintf("all %d succeeded", n), 2*time.Minute, func() bool { return succeeded() == n })
	select {
	case err := <-p.done:
		p.done <- err
		t.Fatalf("the relay exited: %v", err)
	default:
	}
	if rows := count(t, pool, `SELECT count(*) FROM relay.deliveries`); rows != n {
		t.Errorf("%d delivery rows, want %d", rows, n)
	}
	if distinct, _, _, bad := rcv.stats(); distinct != n || bad != 0 {
		t.Errorf("receiver saw %d distinct events (%d bad signatures), want %d", distinct, bad, n)
	}
	out := p.output()
	if !hasAll(out, "nothing from the server for", "replication connection lost") {
		t.Errorf("the relay did not say it lost the frozen server:\n%s", out)
	}
}

// freezeCluster stops every process of the test cluster with SIGSTOP and
// returns the function that resumes them (also run at cleanup, so a test
// that fails in between never leaves the shared cluster stopped).
func freezeCluster(t *testing.T) (thaw func()) {
	t.Helper()
	pid, err := cluster.ServerPID()
	if err != nil {
		t.Fatal(err)
	}
	pids := []int{pid}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // ended meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces, not ')'.
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			pids = append(pids, child)
		}
	}
	if len(pids) < 3 {
		t.Fatalf("found only %v of the cluster's processes", pids)
	}
	for _, p := range pids {
		if err := syscall.Kill(p, syscall.SIGSTOP); err != nil {
			t.Logf("SIGSTOP %d: %v", p, err)
		}
	}
	var once sync.Once
	thaw = func() {
		once.Do(func() {
			for _, p := range pids {
				syscall.Kill(p, syscall.SIGCONT)
			}
		})
	}
	t.Cleanup(thaw)
	return thaw
}
