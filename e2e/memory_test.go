package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// peakRSS reads a process's peak resident set size (VmHWM) in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read /proc status: %v", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			kb, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// logStuck says where a relay that stopped making progress stands: its
// last metrics, and what its walsender and the database's sessions wait
// for.
func logStuck(t *testing.T, pool *pgxpool.Pool, m map[string]float64) {
	t.Helper()
	var names []string
	for k := range m {
		if strings.HasPrefix(k, "outbox_relay_") && !strings.Contains(k, "_bucket") {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	var b strings.Builder
	for _, k := range names {
		fmt.Fprintf(&b, " %s=%v", k, m[k])
	}
	t.Logf("last metrics:%s", b.String())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := pool.Query(ctx, `SELECT pid, backend_type, state, coalesce(wait_event_type || ':' || wait_event, ''), left(coalesce(query, ''), 120),
coalesce((SELECT format('sent %s write %s flush %s, WAL end %s', sent_lsn, write_lsn, flush_lsn, pg_current_wal_lsn()) FROM pg_stat_replication r WHERE r.pid = a.pid), '')
FROM pg_stat_activity a WHERE datname = current_database() OR backend_type = 'walsender'`)
	if err != nil {
		t.Logf("pg_stat_activity: %v", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var pid int
		var typ, state, wait, query, repl *string
		if err := rows.Scan(&pid, &typ, &state, &wait, &query, &repl); err != nil {
			t.Logf("pg_stat_activity: %v", err)
			return
		}
		str := func(p *string) string {
			if p == nil {
				return ""
			}
			return *p
		}
		t.Logf("backend %d %s %s wait=%s %s %q", pid, str(typ), str(state), str(wait), str(repl), str(query))
	}
}

// With the receiver down while events pile up, relay memory stays bounded
// under both overflow policies; when the receiver returns everything is
// delivered and the accounting is exact. Under spill the relay is killed
// with SIGKILL once the backlog is in pending rows (without payloads), and
// a new one delivers it. (BENCHMARKS.md has the 1,000,000
// event run; this one is sized for CI.)
func TestBoundedMemoryWhileReceiverIsDown(t *testing.T) {
	const events = 30000
	for _, policy := range []string{"spill", "block"} {
		t.Run(policy, func(t *testing.T) {
			url, pool := database(t)
			rcv := newReceiver(t)
			var down atomic.Bool
			down.Store(true)
			rcv.fail = func() int {
				if down.Load() {
					return 503
				}
				return 204
			}
			ctx := context.Background()
			if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, breaker_cooldown_ms) VALUES ('ep', 't', $1, ARRAY[$2], 1000)`, rcv.srv.URL, rcv.secret); err != nil {
				t.Fatal(err)
			}
			addr := freeAddr(t)
			args := relayArgs(url, "--overflow", policy, "--queue-events", "2000", "--http-addr", addr,
				"--retry-schedule", "0s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s")
			p := startRelay(t, args...)
			waitServing(t, addr)
			payload := `{"pad": "` + strings.Repeat("x", 400) + `"}`
			for i := 0; i < events; i += 1000 {
				if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'e', $1::jsonb || jsonb_build_object('i', i) FROM generate_series($2::int, $2::int + 999) i`, payload, i); err != nil {
					t.Fatal(err)
				}
			}
			// The breaker opens against the dead receiver and its queue
			// fills. spill: every event is read, the overflow recorded as
			// pending rows. block: reading stops with the queue full and
			// the rest waits in the slot.
			var last map[string]float64
			defer func() {
				if t.Failed() {
					logStuck(t, pool, last)
					p.dumpStacks()
				}
			}()
			waitFor(t, "the backlog to settle", 3*time.Minute, func() bool {
				m := scrape(t, addr)
				last = m
				if policy == "spill" {
					return m["outbox_relay_events_received_total"] == events
				}
				return m["outbox_relay_queue_deliveries"] >= 1900 && m["outbox_relay_replication_lag_bytes"] > 0
			})
			m := scrape(t, addr)
			t.Logf("%s: %v events read, %v queued in memory, %v spilled, slot lag %v bytes", policy, m["outbox_relay_events_received_total"],
				m["outbox_relay_queue_deliveries"], m["outbox_relay_spilled_total"], m["outbox_relay_replication_lag_bytes"])
			if policy == "spill" {
				// The open circuit's queue leaves memory as pending rows,
				// so the slot is acknowledged past every event.
				waitFor(t, "the queue evicted and everything acknowledged", time.Minute, func() bool {
					m := scrape(t, addr)
					return m["outbox_relay_queue_deliveries"] == 0 && m["outbox_relay_unacknowledged_transactions"] == 0
				})
				if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != events {
					t.Errorf("%d rows recorded while the receiver is down, want %d", n, events)
				}
				// Spilled rows hold no payload: their outbox rows do.
				if n := count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'pending' AND payload IS NULL`); n < events/2 {
					t.Errorf("%d pending rows refer to their outbox row, want most of the %d", n, events)
				}
			}
			if policy == "block" {
				// Held back longer than 10 s, the tcp_user_timeout of the
				// relay's ordinary connections and its walsender's
				// wal_sender_timeout: the blocked stream keeps its
				// walsender, since standby status updates still flow (a
				// zero receive window is not a dead peer).
				walsender := func() int {
					return count(t, pool, `SELECT coalesce(max(active_pid), 0) FROM pg_replication_slots WHERE database = current_database()`)
				}
				before := walsender()
				time.Sleep(12 * time.Second)
				if after := walsender(); before == 0 || after != before {
					t.Errorf("walsender pid %d before a 12 s block, %d after: the blocked stream lost its connection", before, after)
				}
				if strings.Contains(p.output(), "replication connection lost") {
					t.Errorf("the blocked relay lost its replication connection")
				}
			}
			rssDown := peakRSS(t, p.cmd.Process.Pid)
			if rssDown > 150<<20 {
				t.Errorf("peak RSS %d MB with the receiver down, want < 150 MB", rssDown>>20)
			}
			if policy == "spill" {
				// kill -9 with the backlog in those rows: a new relay
				// finishes it from the table and the outbox alone.
				p.kill9()
				p = startRelay(t, args...)
			}
			down.Store(false)
			waitFor(t, "every delivery to succeed", 3*time.Minute, func() bool {
				return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == events
			})
			rss := peakRSS(t, p.cmd.Process.Pid)
			t.Logf("%s: peak RSS %.1f MB with %d events held back, %.1f MB after delivering them", policy, float64(rssDown)/(1<<20), events, float64(rss)/(1<<20))
			if rss > 150<<20 {
				t.Errorf("peak RSS %d MB, want < 150 MB", rss>>20)
			}
			if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != events {
				t.Errorf("%d rows, want %d", n, events)
			}
			if distinct, _, _, bad := rcv.stats(); bad != 0 || distinct != events {
				t.Errorf("receiver saw %d distinct events, %d bad signatures", distinct, bad)
			}
		})
	}
}

// A receiver that does not keep up fills the queue: the slow endpoint's
// deliveries past its share leave the queue, so another tenant's events
// behind them in the WAL are not held up. By default they are held in
// memory without their payload (nothing written, payloads read back from
// the outbox); with --queue-held -1 they are spilled as pending rows and
// loaded back. Either way all arrive exactly once, as recorded.
func TestSpillKeepsOtherTenantsFlowing(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		held bool
	}{
		{"held", nil, true},
		{"spilled", []string{"--queue-held", "-1"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) { spillKeepsOthersFlowing(t, tc.args, tc.held) })
	}
}

// slowAndFast configures endpoint "slow" of tenant a, whose receiver
// answers after delay with at most maxInFlight attempts at a time, and
// endpoint "fast" of tenant b.
func slowAndFast(t *testing.T, pool *pgxpool.Pool, delay time.Duration, maxInFlight int) (slow, fast *receiver) {
	t.Helper()
	slow, fast = newReceiver(t), newReceiver(t)
	slow.fail = func() int { time.Sleep(delay); return 204 }
	if _, err := pool.Exec(context.Background(), `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, max_in_flight) VALUES
  ('slow', 'a', $1, ARRAY[$2], $5), ('fast', 'b', $3, ARRAY[$4], NULL)`, slow.srv.URL, slow.secret, fast.srv.URL, fast.secret, maxInFlight); err != nil {
		t.Fatal(err)
	}
	return slow, fast
}

func spillKeepsOthersFlowing(t *testing.T, extra []string, held bool) {
	const slowEvents, fastEvents = 400, 2000
	url, pool := database(t)
	slow, fast := slowAndFast(t, pool, 100*time.Millisecond, 5)
	ctx := context.Background()
	addr := freeAddr(t)
	startRelay(t, relayArgs(url, append([]string{"--queue-events", "200", "--workers", "16", "--http-addr", addr}, extra...)...)...)
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'a', 'e', jsonb_build_object('i', i) FROM generate_series(1, $1::int) i`, slowEvents); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'b', 'e', jsonb_build_object('i', i) FROM generate_series(1, $1::int) i`, fastEvents); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the fast tenant's events", time.Minute, func() bool { d, _, _, _ := fast.stats(); return d == fastEvents })
	if d, _, _, _ := slow.stats(); d >= slowEvents {
		t.Errorf("the slow endpoint finished (%d) before the fast tenant got through: nothing left the queue past it", d)
	}
	waitFor(t, "every delivery to succeed", 2*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == slowEvents+fastEvents
	})
	m := scrape(t, addr)
	spilled, loaded, heldTotal := m["outbox_relay_spilled_total"], m["outbox_relay_loaded_total"], m["outbox_relay_held_total"]
	t.Logf("held %v, spilled %v, loaded %v", heldTotal, spilled, loaded)
	if held && (heldTotal == 0 || spilled != 0 || loaded != 0) {
		t.Errorf("held %v, spilled %v, loaded %v: want the excess held in memory, nothing written as pending", heldTotal, spilled, loaded)
	}
	if !held && (heldTotal != 0 || spilled == 0 || loaded == 0) {
		t.Errorf("held %v, spilled %v, loaded %v with --queue-held -1: want the excess spilled and loaded back", heldTotal, spilled, loaded)
	}
	for name, r := range map[string]*receiver{"slow": slow, "fast": fast} {
		want := map[string]int{"slow": slowEvents, "fast": fastEvents}[name]
		if distinct, total, _, _ := r.stats(); distinct != want || total != want {
			t.Errorf("%s receiver: %d requests for %d events, want %d each", name, total, distinct, want)
		}
	}
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != slowEvents+fastEvents {
		t.Errorf("%d rows, want %d", n, slowEvents+fastEvents)
	}
}

// kill -9 of the relay while deliveries are held (no row written for them,
// the acknowledged LSN held back): the next relay reads them again from
// the slot, and every event ends with exactly one succeeded row.
func TestKill9WhileHeldLosesNothing(t *testing.T) {
	const slowEvents, fastEvents = 600, 300
	url, pool := database(t)
	slow, fast := slowAndFast(t, pool, 20*time.Millisecond, 2)
	ctx := context.Background()
	args := func(addr string) []string {
		return relayArgs(url, "--queue-events", "100", "--workers", "16", "--http-addr", addr)
	}
	addr := freeAddr(t)
	p := startRelay(t, args(addr)...)
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'b', 'e', jsonb_build_object('i', i) FROM generate_series(1, 10) i`); err != nil {
		t.Fatal(err)
	}
	for k := range 30 { // many transactions: most of them wholly held
		if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'a', 'e', jsonb_build_object('i', i) FROM generate_series($1::int, $2::int) i`,
			k*slowEvents/30+1, (k+1)*slowEvents/30); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 'b', 'e', jsonb_build_object('i', i) FROM generate_series(11, $1::int) i`, fastEvents); err != nil {
		t.Fatal(err)
	}
	waitServing(t, addr)
	waitFor(t, "deliveries held", 30*time.Second, func() bool { return scrape(t, addr)["outbox_relay_queue_held"] > slowEvents/2 })
	waitFor(t, "the fast tenant's events", time.Minute, func() bool { d, _, _, _ := fast.stats(); return d == fastEvents })
	rowsAtKill := count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE tenant_id = 'a'`)
	p.kill9()
	slow.mu.Lock()
	slow.fail = nil // answer at once now
	slow.mu.Unlock()
	startRelay(t, args(freeAddr(t))...)
	waitFor(t, "every delivery to succeed", 2*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == slowEvents+fastEvents
	})
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != slowEvents+fastEvents {
		t.Errorf("%d rows, want exactly one per event: %d", n, slowEvents+fastEvents)
	}
	distinct, total, dups, bad := slow.stats()
	t.Logf("slow endpoint: %d rows at the kill; %d requests for %d events, %d duplicates", rowsAtKill, total, distinct, dups)
	if distinct != slowEvents || bad != 0 {
		t.Errorf("slow receiver saw %d of %d events, %d bad signatures", distinct, slowEvents, bad)
	}
	if rowsAtKill > slowEvents/2 {
		t.Errorf("%d of %d slow deliveries had rows at the kill: the test did not kill while most were held", rowsAtKill, slowEvents)
	}
}

// One transaction of 200,000 events (a backfill, say) reaches the relay in
// parts, so it is held in memory no more than a backlog of many
// transactions is; a kill -9 in the middle of it loses nothing, and every
// event ends with one succeeded row.
func TestOneLargeTransactionInBoundedMemory(t *testing.T) {
	const events = 200000
	url, pool := database(t)
	rcv := newReceiver(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`, rcv.srv.URL, rcv.secret); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	args := relayArgs(url, "--http-addr", addr)
	p := startRelay(t, args...)
	waitServing(t, addr)
	payload := `{"pad": "` + strings.Repeat("x", 400) + `"}`
	start := time.Now()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'e', $1::jsonb || jsonb_build_object('i', i) FROM generate_series(1, $2::int) i`, payload, events); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "half the transaction delivered", 3*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) >= events/2
	})
	rss := peakRSS(t, p.cmd.Process.Pid)
	p.kill9()
	t.Logf("half of one %d-event transaction delivered in %s; peak RSS %.1f MiB; kill -9", events, time.Since(start).Round(time.Millisecond), float64(rss)/(1<<20))
	if rss > 150<<20 {
		t.Errorf("peak RSS %d MB while delivering one large transaction, want < 150 MB", rss>>20)
	}
	p = startRelay(t, args...)
	waitFor(t, "every delivery to succeed", 3*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == events
	})
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != events {
		t.Errorf("%d rows, want %d", n, events)
	}
	distinct, total, _, bad := rcv.stats()
	t.Logf("all delivered %s after the insert; the receiver saw %d requests for %d events; the second relay's peak RSS %.1f MiB",
		time.Since(start).Round(time.Millisecond), total, distinct, float64(peakRSS(t, p.cmd.Process.Pid))/(1<<20))
	if distinct != events || bad != 0 {
		t.Errorf("receiver saw %d distinct events, %d bad signatures; want %d and 0", distinct, bad, events)
	}
	if rss := peakRSS(t, p.cmd.Process.Pid); rss > 150<<20 {
		t.Errorf("the second relay's peak RSS %d MB, want < 150 MB", rss>>20)
	}
}
