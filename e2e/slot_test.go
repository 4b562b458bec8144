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
