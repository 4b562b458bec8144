package relay

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// startReportingSlowSQL starts a relay with endpoint "ep" of tenant "t"
// at rcv that reports statements running past 200 ms, and returns how
// many warnings with message msg it has logged so far.
func startReportingSlowSQL(t *testing.T, e *env, rcv *receiver, msg string) (reports func() int) {
	t.Helper()
	e.addEndpoint("ep", "t", rcv)
	var mu sync.Mutex
	var records []slog.Record
	e.startRelay(func(c *Config) {
		c.slowSQL = 200 * time.Millisecond
		c.Logger = slog.New(recordingHandler{&mu, &records})
	})
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, r := range records {
			if r.Message == msg && r.Level == slog.LevelWarn {
				n++
			}
		}
		return n
	}
}

// A status write that hangs (here behind a lock; as well on a server that
// stopped answering) is reported while it hangs, again and again, and no
// more once it is through.
func TestHangingStatusWriteSaysSo(t *testing.T) {
	t.Parallel()
	e, rcv := newEnv(t), newReceiver(t)
	stillRunning := startReportingSlowSQL(t, e, rcv, "status write still running; deliveries and acknowledgements wait for it")
	ctx := context.Background()
	lock, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Rollback(ctx)
	if _, err := lock.Exec(ctx, `LOCK TABLE relay.deliveries IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("the delivery", 20*time.Second, func() bool { return len(rcv.requests()) == 1 })
	e.WaitFor("two reports of the hanging write", 20*time.Second, func() bool { return stillRunning() >= 2 })
	if err := lock.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	e.WaitFor("the status row", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 1
	})
	n := stillRunning()
	time.Sleep(time.Second)
	if m := stillRunning(); m != n {
		t.Errorf("%d more reports after the write was through", m-n)
	}
}

// The same for an endpoint history write, which the stream waits for.
func TestHangingHistoryWriteSaysSo(t *testing.T) {
	t.Parallel()
	e, rcv := newEnv(t), newReceiver(t)
	reports := startReportingSlowSQL(t, e, rcv, "recording endpoint config history still running; the stream waits for it")
	// The startup snapshot is written before the lock is taken.
	e.WaitFor("the startup snapshot", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_history`) == 1
	})
	unlock := lockHistory(t, e)
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 5000 WHERE id = 'ep'`)
	e.WaitFor("a report of the hanging history write", 20*time.Second, func() bool { return reports() >= 1 })
	unlock()
	e.WaitFor("the version recorded", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.endpoint_history`) == 2
	})
}
