package cdc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/internal/relaytest"
	"github.com/outbox-relay/outbox-relay/internal/sockio"
)

var cluster *pgtemp.Cluster

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtemp.WithCluster(m, &cluster))
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("CDC_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newDB creates a fresh database with the relay schema and returns its URL.
func newDB(t *testing.T, c *pgtemp.Cluster) string {
	t.Helper()
	u := pgtemp.NewDatabase(t, c)
	exec(t, u, outboxrelay.Schema)
	return u
}

func exec(t *testing.T, connString string, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("exec %.60q: %v", sql, err)
	}
}

// queryScan runs a one-row query on a connection of its own and scans
// the row into dest.
func queryScan(t *testing.T, connString, sql string, dest any, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, sql, args...).Scan(dest); err != nil {
		t.Fatalf("query %.60q: %v", sql, err)
	}
}

func queryLSN(t *testing.T, connString, sql string, args ...any) LSN {
	t.Helper()
	var s *string
	queryScan(t, connString, sql, &s, args...)
	if s == nil {
		return 0
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		t.Fatal(err)
	}
	return lsn
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// consumer collects batches; with ack set it acknowledges each Position as
// soon as it has stored the batch (its "durable" side is memory).
type consumer struct {
	ack bool

	mu      sync.Mutex
	txns    []Txn
	batches []Batch
	flush   atomic.Uint64
	gate    chan struct{} // if non-nil, the consumer waits for it before each receive
}

func (c *consumer) FlushLSN() LSN { return LSN(c.flush.Load()) }

func (c *consumer) snapshot() []Txn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Txn(nil), c.txns...)
}

func (c *consumer) lastPosition() LSN {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.batches) == 0 {
		return 0
	}
	return c.batches[len(c.batches)-1].Position
}

// run starts s.Run and a consumer goroutine; stop cancels both and returns
// Run's error.
func (c *consumer) run(t *testing.T, s *Stream) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan Batch)
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx, out, c) }()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if c.gate != nil {
				select {
				case <-c.gate:
				case <-ctx.Done():
					return
				}
			}
			select {
			case b := <-out:
				c.mu.Lock()
				c.batches = append(c.batches, b)
				c.txns = append(c.txns, b.Txns...)
				c.mu.Unlock()
				if c.ack {
					c.flush.Store(uint64(b.Position))
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			err = <-runErr
			wg.Wait()
		})
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// slotFor names the slot after the test's database: slots are cluster-wide.
func slotFor(connString string) string {
	u, err := url.Parse(connString)
	if err != nil {
		panic(err)
	}
	name := strings.TrimPrefix(u.Path, "/")
	return "s" + name[max(0, len(name)-40):]
}

func newStream(t *testing.T, connString string, mod func(*Config)) *Stream {
	t.Helper()
	slot := slotFor(connString)
	cfg := Config{ConnString: connString, Logger: testLogger(t), HeartbeatInterval: time.Second, SlotName: slot}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() {
		exec(t, connString, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active`, slot)
	})
	return s
}

// outboxRows returns the payload of every relay.outbox insert, in order.
func outboxRows(txns []Txn) []string {
	var rows []string
	for _, txn := range txns {
		for _, c := range txn.Changes {
			if c.Rel.Name == "outbox" && c.Op == Insert {
				rows = append(rows, string(c.New[c.Rel.ColumnIndex("payload")].Data))
			}
		}
	}
	return rows
}

// insertOutbox commits rows from..to-1 as single-row transactions, in
// order, on one connection.
func insertOutbox(t *testing.T, connString string, from, to int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	for i := from; i < to; i++ {
		if _, err := conn.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'e', jsonb_build_object('n', $1::int))`, i); err != nil {
			t.Fatalf("insert outbox row %d: %v", i, err)
		}
	}
}

func payloads(from, to int) []string {
	var p []string
	for i := from; i < to; i++ {
		p = append(p, fmt.Sprintf(`{"n": %d}`, i))
	}
	return p
}

// checkRowsInOrder checks that txns are in commit order and hold exactly
// the rows payloads(0, n), in order.
func checkRowsInOrder(t *testing.T, txns []Txn, n int, when string) {
	t.Helper()
	checkCommitOrder(t, txns)
	if got, want := strings.Join(outboxRows(txns), ","), strings.Join(payloads(0, n), ","); got != want {
		t.Fatalf("rows %s:\n got %s\nwant %s", when, got, want)
	}
}

func checkCommitOrder(t *testing.T, txns []Txn) {
	t.Helper()
	for i := 1; i < len(txns); i++ {
		if txns[i].EndLSN <= txns[i-1].EndLSN || txns[i].CommitLSN < txns[i-1].EndLSN {
			t.Fatalf("txn %d (%s..%s) not after txn %d (%s..%s)", i, txns[i].CommitLSN, txns[i].EndLSN, i-1, txns[i-1].CommitLSN, txns[i-1].EndLSN)
		}
	}
}

func TestStreamDeliversCommittedTransactions(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	s := newStream(t, u, nil)
	c := &consumer{ack: true}
	c.run(t, s)

	insertOutbox(t, u, 0, 5)
	exec(t, u, `BEGIN; INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'e', '{"n": -1}'); ROLLBACK`)
	exec(t, u, `INSERT INTO relay.outbox (tenant_id, event_type, payload, endpoint_id, headers, traceparent)
		SELECT 't2', 'big', jsonb_build_object('n', g), 'ep_x', '{"x-a": "b"}', '00-abc-def-01' FROM generate_series(5, 5004) g`)
	insertOutbox(t, u, 5005, 5010)
	exec(t, u, `INSERT INTO relay.endpoints (id, tenant_id, url) VALUES ('ep_1', 't1', 'https://a.example/hook')`)
	exec(t, u, `UPDATE relay.endpoints SET enabled = false, url = 'https://b.example/hook' WHERE id = 'ep_1'`)
	exec(t, u, `DELETE FROM relay.endpoints WHERE id = 'ep_1'`)

	waitFor(t, 30*time.Second, "every committed transaction", func() bool { return len(c.snapshot()) >= 5+1+5+3 })
	txns := c.snapshot()
	if len(txns) != 14 {
		t.Fatalf("got %d transactions, want 14", len(txns))
	}
	checkCommitOrder(t, txns)
	if got, want := strings.Join(outboxRows(txns), ","), strings.Join(payloads(0, 5010), ","); got != want {
		t.Fatalf("outbox payloads differ from the committed ones (rolled back row present: %v)", strings.Contains(got, "-1"))
	}
	big := txns[5]
	if len(big.Changes) != 5000 {
		t.Fatalf("the 5,000-row transaction arrived as %d rows", len(big.Changes))
	}
	rel := big.Changes[0].Rel
	row := big.Changes[4999].New
	for col, want := range map[string]string{"tenant_id": "t2", "event_type": "big", "endpoint_id": "ep_x", "headers": `{"x-a": "b"}`, "traceparent": "00-abc-def-01"} {
		if got := string(row[rel.ColumnIndex(col)].Data); got != want {
			t.Errorf("%s = %q, want %q", col, got, want)
		}
	}
	if id := row[rel.ColumnIndex("id")]; id.Kind != 't' || len(id.Data) != 36 {
		t.Errorf("id = %q", id.Data)
	}
	if !big.Changes[0].Rel.Columns[rel.ColumnIndex("id")].Key {
		t.Error("outbox.id is not marked as key")
	}
	if big.CommitTime.IsZero() || time.Since(big.CommitTime) > time.Minute {
		t.Errorf("commit time %v", big.CommitTime)
	}

	ins, upd, del := txns[11].Changes[0], txns[12].Changes[0], txns[13].Changes[0]
	erel := ins.Rel
	if erel.Namespace != "relay" || erel.Name != "endpoints" || ins.Op != Insert || upd.Op != Update || del.Op != Delete {
		t.Fatalf("endpoint changes: %s.%s %s %s %s", erel.Namespace, erel.Name, ins.Op, upd.Op, del.Op)
	}
	if got := string(upd.New[erel.ColumnIndex("url")].Data); got != "https://b.example/hook" || string(upd.New[erel.ColumnIndex("enabled")].Data) != "f" {
		t.Errorf("update new row: url %q enabled %q", got, upd.New[erel.ColumnIndex("enabled")].Data)
	}
	if got := string(del.Old[erel.ColumnIndex("id")].Data); got != "ep_1" {
		t.Errorf("delete old key id = %q", got)
	}
	// Everything was acknowledged: the slot follows.
	last := txns[len(txns)-1].EndLSN
	waitFor(t, 10*time.Second, "confirmed_flush_lsn to reach the last commit", func() bool {
		return queryLSN(t, u, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slotFor(u)) >= last
	})
}

// Not parallel: it restarts the shared cluster, which the parallel tests
// only use after the sequential ones have finished.
func TestStreamSurvivesPostgresRestart(t *testing.T) {
	u := newDB(t, cluster)
	s := newStream(t, u, nil)
	c := &consumer{} // acks nothing: after the restart the server sends everything again
	stop := c.run(t, s)

	insertOutbox(t, u, 0, 10)
	waitFor(t, 20*time.Second, "the first 10 rows", func() bool { return len(outboxRows(c.snapshot())) >= 10 })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := cluster.Restart(ctx, "fast"); err != nil {
		t.Fatalf("restart: %v", err)
	}
	insertOutbox(t, u, 10, 20)
	waitFor(t, 30*time.Second, "the rows inserted after the restart", func() bool { return len(outboxRows(c.snapshot())) >= 20 })
	if st := s.Status(); !st.Connected {
		t.Errorf("status after reconnect: %+v", st)
	}
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v, want context.Canceled", err)
	}
	checkRowsInOrder(t, c.snapshot(), 20, "across the restart")
}

func TestStreamResumesAtConfirmedPosition(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)

	// A consumer that acknowledges nothing: the next Stream (a new process)
	// gets the same transactions again.
	c1 := &consumer{}
	stop := c1.run(t, newStream(t, u, nil))
	insertOutbox(t, u, 0, 3)
	waitFor(t, 20*time.Second, "3 rows", func() bool { return len(outboxRows(c1.snapshot())) == 3 })
	stop()

	c2 := &consumer{ack: true}
	s2 := newStream(t, u, nil)
	stop = c2.run(t, s2)
	waitFor(t, 20*time.Second, "re-delivery of 3 rows", func() bool { return len(outboxRows(c2.snapshot())) == 3 })
	if got, want := strings.Join(outboxRows(c2.snapshot()), ","), strings.Join(payloads(0, 3), ","); got != want {
		t.Fatalf("re-delivered %s, want %s", got, want)
	}
	// c2 acknowledges: once the flush reached Postgres, a third process
	// starts after them.
	pos := c2.lastPosition()
	waitFor(t, 10*time.Second, "the flush position to be sent", func() bool { return s2.Status().FlushedLSN >= pos })
	stop()
	if got := queryLSN(t, u, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slotFor(u)); got < pos {
		t.Fatalf("confirmed_flush_lsn %s < acknowledged %s", got, pos)
	}

	c3 := &consumer{ack: true}
	c3.run(t, newStream(t, u, nil))
	insertOutbox(t, u, 3, 4)
	waitFor(t, 20*time.Second, "the new row", func() bool { return len(outboxRows(c3.snapshot())) >= 1 })
	if got := strings.Join(outboxRows(c3.snapshot()), ","); got != `{"n": 3}` {
		t.Fatalf("after acknowledgement got %s, want only the new row", got)
	}
}

// The consumer does not take a Batch for longer than wal_sender_timeout;
// the status updates keep the same walsender alive.
func TestStreamBlockedConsumerKeepsConnection(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	// wal_sender_timeout can be set per connection: 1s for this one only.
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	pu.RawQuery += "&options=-c%20wal_sender_timeout%3D1s"
	s := newStream(t, pu.String(), nil)
	c := &consumer{ack: true, gate: make(chan struct{})}
	c.run(t, s)

	activePID := func() int {
		var pid *int
		queryScan(t, u, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, &pid, slotFor(u))
		if pid == nil {
			return 0
		}
		return *pid
	}
	waitFor(t, 10*time.Second, "the walsender", func() bool { return activePID() != 0 })
	pid := activePID()

	insertOutbox(t, u, 0, 3)
	// Hold the consumer for 3 × wal_sender_timeout while watching that the
	// walsender stays the same process.
	blockedUntil := time.Now().Add(3 * time.Second)
	waitFor(t, 10*time.Second, "3s of blocking", func() bool {
		if p := activePID(); p != pid {
			t.Fatalf("walsender changed from %d to %d while the consumer blocked", pid, p)
		}
		return time.Now().After(blockedUntil)
	})
	if st := s.Status(); !st.Connected || st.LastError != nil || time.Since(st.LastStatusAt) > time.Second {
		t.Fatalf("status while blocked: %+v", st)
	}
	close(c.gate) // the consumer takes everything from now on
	waitFor(t, 10*time.Second, "the 3 rows", func() bool { return len(outboxRows(c.snapshot())) == 3 })
	if p := activePID(); p != pid {
		t.Fatalf("walsender changed from %d to %d", pid, p)
	}
}

func TestStreamIdleSlotAdvances(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	s := newStream(t, u, func(c *Config) { c.HeartbeatInterval = 200 * time.Millisecond })
	slotLSN := func() LSN {
		return queryLSN(t, u, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slotFor(u))
	}
	start := slotLSN()
	c := &consumer{ack: true}
	c.run(t, s)
	// Nothing is written to the database: only the heartbeat moves the WAL.
	waitFor(t, 15*time.Second, "confirmed_flush_lsn to advance on an idle database", func() bool { return slotLSN() > start })
	if n := len(c.snapshot()); n != 0 {
		t.Fatalf("idle stream handed over %d transactions", n)
	}
}

func setupErr(t *testing.T, connString string, mod func(*Config)) error {
	t.Helper()
	cfg := Config{ConnString: connString, Logger: testLogger(t)}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = s.Setup(ctx)
	if err != nil {
		t.Logf("Setup: %v", err)
	}
	return err
}

func TestSetupChecks(t *testing.T) {
	t.Parallel()
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		err := setupErr(t, "postgres://postgres@127.0.0.1:1/nope?sslmode=disable&connect_timeout=5", nil)
		if !errors.Is(err, ErrConnect) {
			t.Fatalf("err = %v, want ErrConnect", err)
		}
	})
	t.Run("role without replication", func(t *testing.T) {
		t.Parallel()
		u := newDB(t, cluster)
		role := fmt.Sprintf("norepl_%d", time.Now().UnixNano())
		exec(t, u, fmt.Sprintf(`CREATE ROLE %s LOGIN NOREPLICATION`, role))
		t.Cleanup(func() { exec(t, u, fmt.Sprintf(`DROP OWNED BY %s; DROP ROLE %s`, role, role)) })
		pu, _ := url.Parse(u)
		pu.User = url.User(role)
		err := setupErr(t, pu.String(), nil)
		if !errors.Is(err, ErrNoReplication) || !strings.Contains(err.Error(), `ALTER ROLE "`+role+`" REPLICATION`) {
			t.Fatalf("err = %v, want ErrNoReplication with the fix", err)
		}
	})
	t.Run("publication missing a table", func(t *testing.T) {
		t.Parallel()
		u := newDB(t, cluster)
		exec(t, u, `CREATE PUBLICATION outbox_relay FOR TABLE relay.outbox, relay.tenants`)
		err := setupErr(t, u, nil)
		if !errors.Is(err, ErrPublicationMissingTable) {
			t.Fatalf("err = %v, want ErrPublicationMissingTable", err)
		}
		// The message carries the exact statement that fixes it.
		_, fix, _ := strings.Cut(err.Error(), "run: ")
		exec(t, u, fix)
		if err := setupErr(t, u, nil); err != nil {
			t.Fatalf("after %q: %v", fix, err)
		}
	})
	t.Run("slot with another plugin", func(t *testing.T) {
		t.Parallel()
		u := newDB(t, cluster)
		slot := fmt.Sprintf("td_%d", time.Now().UnixNano())
		exec(t, u, `SELECT pg_create_logical_replication_slot($1, 'test_decoding')`, slot)
		t.Cleanup(func() { exec(t, u, `SELECT pg_drop_replication_slot($1)`, slot) })
		err := setupErr(t, u, func(c *Config) { c.SlotName = slot })
		if !errors.Is(err, ErrSlotPlugin) {
			t.Fatalf("err = %v, want ErrSlotPlugin", err)
		}
	})
	t.Run("table missing", func(t *testing.T) {
		t.Parallel()
		u := pgtemp.NewDatabase(t, cluster)
		if err := setupErr(t, u, nil); !errors.Is(err, ErrTableMissing) {
			t.Fatalf("err = %v, want ErrTableMissing", err)
		}
	})
	t.Run("wal_level replica", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c, err := pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{"wal_level": "replica"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Stop()
		err = setupErr(t, c.URL("postgres"), nil)
		if !errors.Is(err, ErrWALLevel) || !strings.Contains(err.Error(), "wal_level = logical") {
			t.Fatalf("err = %v, want ErrWALLevel", err)
		}
	})
	t.Run("slot invalidated", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c, err := pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Stop()
		u := c.URL("postgres")
		exec(t, u, outboxrelay.Schema)
		if err := setupErr(t, u, nil); err != nil {
			t.Fatal(err)
		}
		// Write WAL past max_slot_wal_keep_size with nobody streaming;
		// the checkpoint invalidates the slot.
		waitFor(t, 30*time.Second, "the slot to be invalidated", func() bool {
			exec(t, u, `INSERT INTO relay.tenants (id) SELECT 'x' || g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING`)
			exec(t, u, `SELECT pg_switch_wal()`)
			exec(t, u, `CHECKPOINT`)
			return errors.Is(setupErr(t, u, nil), ErrSlotLost)
		})
		err = setupErr(t, u, nil)
		if !strings.Contains(err.Error(), "pg_drop_replication_slot('outbox_relay')") || !strings.Contains(err.Error(), "relay.outbox") {
			t.Fatalf("message does not say what to do: %v", err)
		}
		// Run does not loop on it either.
		s, err := New(Config{ConnString: u, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Run(ctx, make(chan Batch), &consumer{}); !errors.Is(err, ErrSlotLost) {
			t.Fatalf("Run = %v, want ErrSlotLost", err)
		}
	})
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg   Config
		field string
	}{
		{Config{}, "ConnString"},
		{Config{ConnString: "postgres://x/y", SlotName: "Bad-Name"}, "SlotName"},
		{Config{ConnString: "postgres://x/y", Publication: "p;drop"}, "Publication"},
		{Config{ConnString: "postgres://x/y", Tables: []string{"outbox"}}, "Tables"},
		{Config{ConnString: "postgres://x/y", StatusInterval: -1}, "StatusInterval"},
		{Config{ConnString: "postgres://x/y", MaxBatchTxns: -1}, "MaxBatchTxns"},
	} {
		_, err := New(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), "Config."+tc.field) {
			t.Errorf("New(%+v) = %v, want an error naming %s", tc.cfg, err, tc.field)
		}
	}
	s, err := New(Config{ConnString: "postgres://x/y"})
	if err != nil {
		t.Fatal(err)
	}
	if s.cfg.SlotName != "outbox_relay" || s.cfg.Publication != "outbox_relay" || len(s.cfg.Tables) != 3 ||
		s.cfg.StatusInterval != 100*time.Millisecond || s.cfg.HeartbeatInterval != 10*time.Second || s.cfg.MaxBatchTxns != 256 {
		t.Fatalf("defaults: %+v", s.cfg)
	}
}

// A Batch closes once its transactions' WAL messages reach MaxBatchBytes
// (one transaction is never split), so what waits between the stream and
// a consumer stays bounded however much WAL is buffered. Without the bound
// the same backlog comes in batches of many transactions.
func TestStreamBatchBytesBound(t *testing.T) {
	t.Parallel()
	const n = 200
	maxTxns := func(t *testing.T, bound int) int {
		u := newDB(t, cluster)
		s := newStream(t, u, func(c *Config) { c.MaxBatchBytes = bound; c.MaxBatchDelay = time.Second })
		insertOutbox(t, u, 0, n) // a backlog of single-row transactions, committed before the stream starts
		// The consumer waits a moment before its first receive, so the
		// stream has the backlog buffered: whether transactions share a
		// Batch then depends on the bound, not on whether the reader
		// happened to fall behind the walsender.
		c := &consumer{ack: true, gate: make(chan struct{})}
		c.run(t, s)
		time.Sleep(500 * time.Millisecond)
		close(c.gate)
		waitFor(t, 30*time.Second, fmt.Sprintf("%d rows", n), func() bool { return len(outboxRows(c.snapshot())) == n })
		if got, want := outboxRows(c.snapshot()), payloads(0, n); !slices.Equal(got, want) {
			t.Fatalf("rows out of order or altered")
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		most := 0
		for _, b := range c.batches {
			most = max(most, len(b.Txns))
		}
		return most
	}
	if n := maxTxns(t, 1); n != 1 {
		t.Errorf("MaxBatchBytes 1: a Batch held %d transactions, want 1", n)
	}
	if n := maxTxns(t, 1<<30); n < 2 {
		t.Errorf("without a byte bound every Batch held one transaction: the test cannot tell the bound works")
	}
}

// Every connection of the stream asks the server to drop it soon when the
// relay vanishes from the network, unless the URL says otherwise: the
// ordinary ones by keepalives and tcp_user_timeout, the walsender's by
// keepalives and wal_sender_timeout.
func TestConnectionsAskForShortTCPTimeouts(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	ctx := context.Background()
	wantClientUser := 10000
	show := func(connString, walSenderTimeout, replUserTimeout string) (userTimeout, idle string) {
		t.Helper()
		s, err := New(Config{ConnString: connString})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := pgx.ConnectConfig(ctx, s.pgxCfg)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		if err := conn.QueryRow(ctx, `SELECT current_setting('tcp_user_timeout'), current_setting('tcp_keepalives_idle')`).Scan(&userTimeout, &idle); err != nil {
			t.Fatal(err)
		}
		// The walsender's connection carries the same settings.
		repl, err := pgconn.ConnectConfig(ctx, s.replCfg)
		if err != nil {
			t.Fatal(err)
		}
		defer repl.Close(ctx)
		// Both read their sockets with raw syscalls (PrepareSession, prepare).
		for name, nc := range map[string]net.Conn{"ordinary": conn.PgConn().Conn(), "walsender": repl.Conn()} {
			sc, ok := nc.(*sockio.Conn)
			if !ok {
				t.Errorf("%s connection's socket is a %T, not read through sockio", name, nc)
				continue
			}
			// The relay's end keeps alive and gives up as the server's does.
			got := clientSockopts(t, sc.Conn)
			want := map[string]int{"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": wantClientUser}
			if !maps.Equal(got, want) {
				t.Errorf("%s connection's client socket options %v, want %v", name, got, want)
			}
		}
		for setting, want := range map[string]string{"tcp_keepalives_idle": idle, "wal_sender_timeout": walSenderTimeout,
			"tcp_user_timeout": replUserTimeout} { // by default 0: a blocked stream's zero window must not end it
			res, err := repl.Exec(ctx, `SHOW `+setting).ReadAll()
			if err != nil {
				t.Fatal(err)
			}
			if got := string(res[0].Rows[0][0]); got != want {
				t.Errorf("walsender connection: %s %q, want %q", setting, got, want)
			}
		}
		return userTimeout, idle
	}
	if ut, idle := show(u, "10s", "0"); ut != "10000" || idle != "5" {
		t.Errorf("default: tcp_user_timeout %q, tcp_keepalives_idle %q; want 10000 (ms) and 5", ut, idle)
	}
	sep := "?"
	if strings.Contains(u, "?") {
		sep = "&"
	}
	wantClientUser = 3000
	if ut, _ := show(u+sep+"tcp_user_timeout=3000&wal_sender_timeout=20s", "20s", "3000"); ut != "3000" {
		t.Errorf("the URL's tcp_user_timeout=3000 gave %q, want 3000", ut)
	}
}

// The receive timeout outlasts the walsender's: while the walsender
// decodes a large transaction the stream does not subscribe to, it sends
// nothing and reads the stream's replies, so answers its request for one,
// only every half wal_sender_timeout. With the URL's wal_sender_timeout
// at 60s, a 30s receive timeout would end the connection during every
// such decode longer than that, and the next connection would decode the
// same transaction again.
func TestReceiveTimeoutOutlastsTheWalSenderTimeout(t *testing.T) {
	base := "postgres://postgres@127.0.0.1:5432/app?sslmode=disable"
	for _, c := range []struct {
		params string
		set    time.Duration
		want   time.Duration
	}{
		{"", 0, 30 * time.Second}, // the relay's own wal_sender_timeout, 10s
		{"&wal_sender_timeout=5s", 0, 30 * time.Second},
		{"&wal_sender_timeout=60s", 0, 2 * time.Minute},
		{"&wal_sender_timeout=1min", 0, 2 * time.Minute},
		{"&wal_sender_timeout=90000", 0, 3 * time.Minute}, // milliseconds, the server's unit
		{"&wal_sender_timeout=2.5min", 0, 5 * time.Minute},
		{"&wal_sender_timeout=1h", 0, 2 * time.Hour},
		{"&wal_sender_timeout=0", 0, 30 * time.Second}, // off: the walsender reads replies as it decodes
		{"&wal_sender_timeout=soon", 0, 30 * time.Second},
		{"&wal_sender_timeout=60s", 7 * time.Second, 7 * time.Second}, // set: kept
	} {
		s, err := New(Config{ConnString: base + c.params, ReceiveTimeout: c.set})
		if err != nil {
			t.Fatal(err)
		}
		if got := s.cfg.ReceiveTimeout; got != c.want {
			t.Errorf("%q with ReceiveTimeout %v: %v, want %v", c.params, c.set, got, c.want)
		}
	}
}

// A server that accepts the TCP connection and never answers (a stopped
// postmaster, a proxy without a backend) ends each of the relay's
// connection attempts after connectTimeout, or after the URL's
// connect_timeout, with an error that says it timed out; before, the
// attempt waited forever, since such a peer's kernel acknowledges every
// packet and neither keepalives nor the user timeout fire.
func TestConnectGivesUpOnASilentServer(t *testing.T) {
	t.Parallel()
	base := "postgres://postgres@" + relaytest.SilentServer(t) + "/app"
	cases := []struct {
		name, url string
		want      time.Duration
	}{
		{"default, TLS preferred", base, connectTimeout}, // the TLS request and the plain retry share it
		{"default, plain", base + "?sslmode=disable", connectTimeout},
		{"connect_timeout=1", base + "?sslmode=disable&connect_timeout=1", time.Second},
	}
	var wg sync.WaitGroup
	for _, c := range cases {
		s, err := New(Config{ConnString: c.url})
		if err != nil {
			t.Fatal(err)
		}
		for kind, connect := range map[string]func(ctx context.Context) error{
			"ordinary": func(ctx context.Context) error {
				conn, err := pgx.ConnectConfig(ctx, s.pgxCfg)
				if err == nil {
					conn.Close(ctx)
				}
				return err
			},
			"replication": func(ctx context.Context) error {
				conn, err := pgconn.ConnectConfig(ctx, s.replCfg)
				if err == nil {
					conn.Close(ctx)
				}
				return err
			},
		} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), c.want+20*time.Second)
				defer cancel()
				t0 := time.Now()
				err := connect(ctx)
				took := time.Since(t0)
				switch {
				case err == nil:
					t.Errorf("%s, %s connection: connected to a server that never answers", c.name, kind)
				case ctx.Err() != nil:
					t.Errorf("%s, %s connection: still waiting after %v", c.name, kind, took)
				case took < c.want-100*time.Millisecond || took > c.want+3*time.Second:
					t.Errorf("%s, %s connection: gave up after %v, want about %v (%v)", c.name, kind, took, c.want, err)
				case !pgconn.Timeout(err) && !strings.Contains(err.Error(), "timeout"):
					t.Errorf("%s, %s connection: error %q does not say it timed out", c.name, kind, err)
				}
			}()
		}
	}
	wg.Wait()
}

// Over a Unix socket the stream reads the same transactions (its sockets
// are read with raw syscalls, internal/sockio, on Unix sockets as on
// TCP), and the walsender's client has no address: it is the socket.
func TestStreamOverUnixSocket(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	q := pu.Query()
	q.Set("host", cluster.SocketDir())
	q.Set("port", pu.Port())
	pu.RawQuery = q.Encode()
	pu.Host = ""
	su := pu.String()
	s := newStream(t, su, nil)
	c := &consumer{ack: true}
	c.run(t, s)
	insertOutbox(t, su, 0, 50)
	waitFor(t, 30*time.Second, "50 transactions over the socket", func() bool { return len(c.snapshot()) >= 50 })
	if got, want := strings.Join(outboxRows(c.snapshot()), ","), strings.Join(payloads(0, 50), ","); got != want {
		t.Fatalf("payloads over the socket differ from those committed:\n got %s\nwant %s", got, want)
	}
	var viaSocket int
	queryScan(t, u, `SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1 AND r.client_addr IS NULL`, &viaSocket, slotFor(u))
	if viaSocket != 1 {
		t.Fatalf("%d walsenders of the slot have a client on the Unix socket, want 1", viaSocket)
	}
}

// syncBuffer is a log sink that tests can read while the stream writes.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A replication connection that goes silent without closing (a vanished
// host, a partition) is given up after ReceiveTimeout and replaced; the
// stream goes on from where it was.
func TestStreamGivesUpASilentConnection(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	target, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	proxy := relaytest.NewFreezeProxy(t, target.Host)
	// The frozen walsender hears no status updates and ends itself after
	// 1s, so the slot is free for the next connection soon.
	pu := proxy.URL(t, u) + "&options=-c%20wal_sender_timeout%3D1s"
	var logs syncBuffer
	s := newStream(t, pu, func(c *Config) {
		c.ReceiveTimeout = 2 * time.Second
		c.HeartbeatInterval = time.Hour // no heartbeat data to break the silence by another route
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	c := &consumer{ack: true}
	c.run(t, s)

	insertOutbox(t, u, 0, 3)
	waitFor(t, 20*time.Second, "the first 3 rows", func() bool { return len(outboxRows(c.snapshot())) >= 3 })
	if n := proxy.Freeze(); n == 0 {
		t.Fatal("no connection to freeze")
	}
	frozen := time.Now()
	insertOutbox(t, u, 3, 6)
	waitFor(t, 30*time.Second, "the rows committed after the freeze", func() bool { return len(outboxRows(c.snapshot())) >= 6 })
	t.Logf("rows after the freeze came %v later", time.Since(frozen).Round(time.Millisecond))
	if !strings.Contains(logs.String(), "nothing from the server for") {
		t.Errorf("the reconnect did not say why; log:\n%s", logs.String())
	}
	checkRowsInOrder(t, c.snapshot(), 6, "across the silent connection")
}

// An idle connection to a live server is kept past ReceiveTimeout: the
// request for a reply halfway through is answered.
func TestStreamKeepsAQuietLiveConnection(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	var logs syncBuffer
	s := newStream(t, u, func(c *Config) {
		c.ReceiveTimeout = time.Second
		c.HeartbeatInterval = time.Hour
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	c := &consumer{ack: true}
	c.run(t, s)
	insertOutbox(t, u, 0, 1)
	waitFor(t, 20*time.Second, "the first row", func() bool { return len(outboxRows(c.snapshot())) >= 1 })
	time.Sleep(4 * time.Second) // nothing committed: four receive timeouts of quiet
	if strings.Contains(logs.String(), "reconnecting") {
		t.Fatalf("a quiet live connection was given up; log:\n%s", logs.String())
	}
	insertOutbox(t, u, 1, 2)
	waitFor(t, 20*time.Second, "the second row", func() bool { return len(outboxRows(c.snapshot())) >= 2 })
}

// insertOneTxn commits rows from..to-1 in one transaction, each with a
// pad of padBytes.
func insertOneTxn(t *testing.T, connString string, from, to, padBytes int) {
	t.Helper()
	exec(t, connString, `INSERT INTO relay.outbox (tenant_id, event_type, payload)
SELECT 't1', 'e', jsonb_build_object('n', i, 'pad', repeat('x', $3::int)) FROM generate_series($1::int, $2::int - 1) i`, from, to, padBytes)
}

// rowNumbers returns the n of every relay.outbox insert, in order.
func rowNumbers(t *testing.T, txns []Txn) []int {
	t.Helper()
	var ns []int
	for _, txn := range txns {
		for _, c := range txn.Changes {
			if c.Rel.Name == "outbox" && c.Op == Insert {
				var row struct{ N int }
				if err := json.Unmarshal(c.New[c.Rel.ColumnIndex("payload")].Data, &row); err != nil {
					t.Fatal(err)
				}
				ns = append(ns, row.N)
			}
		}
	}
	return ns
}

// checkParts checks that parts come as the stream promises: a run of
// Txns with More, then the same transaction's last part without it; only
// that last part has an EndLSN. It returns how many parts each
// transaction came in.
func checkParts(t *testing.T, txns []Txn) []int {
	t.Helper()
	var parts []int
	n := 0
	for i, txn := range txns {
		n++
		if i > 0 && txns[i-1].More && (txns[i-1].XID != txn.XID || txns[i-1].CommitLSN != txn.CommitLSN) {
			t.Fatalf("txn %d (xid %d at %s) follows a part of xid %d at %s", i, txn.XID, txn.CommitLSN, txns[i-1].XID, txns[i-1].CommitLSN)
		}
		if txn.More != (txn.EndLSN == 0) {
			t.Fatalf("txn %d: More %v with EndLSN %s", i, txn.More, txn.EndLSN)
		}
		if !txn.More {
			parts = append(parts, n)
			n = 0
		}
	}
	return parts
}

// A transaction larger than MaxBatchBytes comes in parts of about that
// size, in order, none of them confirmable before the last.
func TestStreamHandsALargeTransactionOverInParts(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	s := newStream(t, u, func(c *Config) { c.MaxBatchBytes = 64 << 10 })
	c := &consumer{ack: true}
	c.run(t, s)
	insertOutbox(t, u, 0, 1)
	insertOneTxn(t, u, 1, 2001, 500) // about 1 MB of WAL messages
	insertOutbox(t, u, 2001, 2002)
	waitFor(t, 30*time.Second, "every row", func() bool { return len(outboxRows(c.snapshot())) >= 2002 })
	txns := c.snapshot()
	parts := checkParts(t, txns)
	if len(parts) != 3 || parts[0] != 1 || parts[2] != 1 || parts[1] < 10 {
		t.Fatalf("transactions came in %v parts, want [1 >=10 1]", parts)
	}
	ns := rowNumbers(t, txns)
	for i, n := range ns {
		if n != i {
			t.Fatalf("row %d is n=%d: out of order, lost or repeated (%d rows)", i, n, len(ns))
		}
	}
	if len(ns) != 2002 {
		t.Fatalf("%d rows, want 2002", len(ns))
	}
	// No Batch holding a part claims a Position past the transaction's
	// start, and no part is bigger than about the bound.
	c.mu.Lock()
	defer c.mu.Unlock()
	big := txns[1].CommitLSN
	for _, b := range c.batches {
		for _, txn := range b.Txns {
			if txn.More && b.Position >= big {
				t.Errorf("a Batch with a part has Position %s, at or past the transaction's commit %s", b.Position, big)
			}
			if n := len(txn.Changes); txn.More && n > 150 {
				t.Errorf("a part of %d rows of ~530 bytes, for a 64 KiB bound", n)
			}
		}
	}
}

// A connection lost while a large transaction is half handed over: the
// server sends it again from its Begin, and the stream skips what it
// already handed, so each row comes once.
func TestStreamResumesALargeTransactionWithoutRepeats(t *testing.T) {
	t.Parallel()
	u := newDB(t, cluster)
	var logs syncBuffer
	s := newStream(t, u, func(c *Config) {
		c.MaxBatchBytes = 64 << 10
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	// The consumer takes 20 Batches, then waits: the stream stops reading
	// mid-transaction, and the walsender waits with the rest.
	c := &consumer{gate: make(chan struct{}, 100000)}
	for range 20 {
		c.gate <- struct{}{}
	}
	c.run(t, s)
	const rows = 40000 // about 22 MB, more than the sockets buffer
	insertOneTxn(t, u, 0, rows, 500)
	deadline := time.Now().Add(30 * time.Second)
	for len(c.gate) > 0 || len(outboxRows(c.snapshot())) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the consumer took %d batches, %d rows; log:\n%s", 20-len(c.gate), len(outboxRows(c.snapshot())), logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	var pid int
	queryScan(t, u, `SELECT pg_terminate_backend(active_pid)::int * active_pid FROM pg_replication_slots WHERE slot_name = $1`, &pid, slotFor(u))
	if pid == 0 {
		t.Fatal("no walsender to end")
	}
	for range cap(c.gate) - 1 {
		c.gate <- struct{}{}
	}
	waitFor(t, 60*time.Second, "every row", func() bool { return len(outboxRows(c.snapshot())) >= rows })
	if !strings.Contains(logs.String(), "replication connection lost") {
		t.Fatalf("the connection was not lost; the test proves nothing. log:\n%s", logs.String())
	}
	time.Sleep(200 * time.Millisecond) // anything repeated would arrive by now
	txns := c.snapshot()
	checkParts(t, txns)
	ns := rowNumbers(t, txns)
	if len(ns) != rows {
		t.Errorf("%d rows, want %d", len(ns), rows)
	}
	for i, n := range ns {
		if n != i {
			t.Fatalf("row %d is n=%d: repeated or lost across the reconnect", i, n)
		}
	}
}
