package relay

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"
)

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// recordingHandler keeps every record logged through it.
type recordingHandler struct {
	mu      *sync.Mutex
	records *[]slog.Record
}

func (h recordingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h recordingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	*h.records = append(*h.records, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h recordingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h recordingHandler) WithGroup(string) slog.Handler      { return h }

// A transaction that changes many endpoints logs the first 20 changes at
// info level, the rest at debug, and says how many more there were; one
// that changes a few logs each at info.
func TestBulkEndpointChangesLogOneLineForTheRest(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	var mu sync.Mutex
	var records []slog.Record
	e.startRelay(func(c *Config) { c.Logger = slog.New(recordingHandler{&mu, &records}) })
	e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets) SELECT 'ep_' || g, 't', $1, ARRAY[$2] FROM generate_series(1, 30) g`,
		rcv.srv.URL+"/hook", rcv.secret)
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 5000 WHERE id IN ('ep_1', 'ep_2')`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("the event delivered to all 30 endpoints", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 30
	})
	mu.Lock()
	defer mu.Unlock()
	levels := map[slog.Level]int{}
	var summaries []int64
	for _, r := range records {
		switch r.Message {
		case "endpoint config changed":
			levels[r.Level]++
		case "more endpoint config changes in this transaction, logged at debug level":
			r.Attrs(func(a slog.Attr) bool {
				if a.Key == "endpoints" {
					summaries = append(summaries, a.Value.Int64())
				}
				return true
			})
		}
	}
	// 20 of the insert's 30 at info, the update's 2 at info.
	if levels[slog.LevelInfo] != 22 || levels[slog.LevelDebug] != 10 {
		t.Errorf("change lines by level %v, want 22 at info and 10 at debug", levels)
	}
	if !slices.Equal(summaries, []int64{10}) {
		t.Errorf("summary lines say %v more, want one saying 10", summaries)
	}
}
