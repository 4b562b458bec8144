package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
)

// Past --slot-warn-bytes of retained WAL the relay warns in its log and
// exports the figure.
func TestRetainedWALWarning(t *testing.T) {
	url, _ := database(t)
	addr := freeAddr(t)
	p := startRelay(t, relayArgs(url, "--slot-warn-bytes", "1", "--slot-check-interval", "100ms", "--http-addr", addr)...)
	waitFor(t, "the retained-WAL warning", 20*time.Second, func() bool {
		return strings.Contains(p.output(), "replication slot retains a lot of WAL")
	})
	if m := scrape(t, addr); m["outbox_relay_slot_retained_wal_bytes"] <= 0 {
		t.Errorf("outbox_relay_slot_retained_wal_bytes = %v", m["outbox_relay_slot_retained_wal_bytes"])
	}
}

// A slot the server invalidated (max_slot_wal_keep_size) stops the relay
// with an error saying what happened and what to do, instead of a loop.
func TestInvalidatedSlotStopsWithAClearError(t *testing.T) {
	if !cluster.Owned() {
		t.Skip("needs its own cluster")
	}
	ctx := context.Background()
	c, err := pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()
	url, err := c.CreateDatabase(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := runBinary("migrate", "--database-url", url); err != nil {
		t.Fatalf("migrate: %v %s", err, out)
	}
	pool := connect(t, url)
	waitFor(t, "the slot to be invalidated", 60*time.Second, func() bool {
		pool.Exec(ctx, `INSERT INTO relay.tenants (id) SELECT 'x' || g FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING`)
		pool.Exec(ctx, `SELECT pg_switch_wal()`)
		pool.Exec(ctx, `CHECKPOINT`)
		var status string
		pool.QueryRow(ctx, `SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&status)
		return status == "lost"
	})
	runFails(t, []string{"invalidated", "pg_drop_replication_slot", "relay.outbox"}, relayArgs(url)...)
}

// A slot that disappears (dropped, or lost in a failover to a server
// without it) is created anew at the next start, and what was committed
// while it was gone was never in any slot's WAL. The relay cannot
// deliver those events, but it says so, loudly and with a count, at
// once: before, it logged only "created replication slot" and the gap
// went unnoticed. migrate says the same when it is the one that creates
// the slot.
func TestLostSlotIsReported(t *testing.T) {
	url, pool := database(t)
	rcv := newReceiver(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`, rcv.srv.URL, rcv.secret); err != nil {
		t.Fatal(err)
	}
	insert := func(n int) {
		t.Helper()
		if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'e', '{}' FROM generate_series(1, $1::int)`, n); err != nil {
			t.Fatal(err)
		}
	}
	succeeded := func() int { return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) }
	dropSlot := func() {
		t.Helper()
		waitFor(t, "the slot to be dropped", 30*time.Second, func() bool {
			_, err := pool.Exec(ctx, `SELECT pg_drop_replication_slot('outbox_relay')`) // fails while a walsender still holds it
			return err == nil
		})
	}
	p := startRelay(t, relayArgs(url)...)
	insert(10)
	waitFor(t, "10 succeeded", time.Minute, func() bool { return succeeded() == 10 })
	if strings.Contains(p.output(), "created anew") {
		t.Fatalf("a first start reported a lost slot:\n%s", p.output())
	}
	p.kill9()
	dropSlot()
	insert(5) // committed while no slot exists: in no slot's WAL
	p = startRelay(t, relayArgs(url)...)
	waitFor(t, "the relay to report the lost slot", 30*time.Second, func() bool {
		return hasAll(p.output(), "level=ERROR", "created anew", "5 rows of relay.outbox have no delivery row")
	})
	insert(3)
	waitFor(t, "the 3 events after the new slot", time.Minute, func() bool { return succeeded() == 13 })
	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != 13 {
		t.Errorf("%d delivery rows, want 13 (the 5 events of the gap have none)", n)
	}
	p.kill9()
	dropSlot()
	out, err := runBinary("migrate", "--database-url", url)
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	if !hasAll(out, "created anew", "5 rows of relay.outbox have no delivery row") {
		t.Errorf("migrate, creating the slot again, did not report the gap:\n%s", out)
	}
}
