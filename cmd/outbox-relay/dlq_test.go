package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/dlq"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/relay"
)

// dlqCluster starts a throwaway cluster for this test alone (or uses the
// server in OUTBOX_RELAY_TEST_DATABASE_URL), so the test needs nothing
// from this package's TestMain.
func dlqCluster(t *testing.T) *pgtemp.Cluster {
	t.Helper()
	if u := os.Getenv(pgtemp.EnvDatabaseURL); u != "" {
		c, err := pgtemp.External(u)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgtemp.Start(ctx, pgtemp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
	})
	return c
}

// flakyReceiver answers 500 with a body until recovered, then 200, and
// counts requests per webhook-id.
type flakyReceiver struct {
	srv       *httptest.Server
	recovered atomic.Bool
	mu        sync.Mutex
	byID      map[string]int
}

func newFlakyReceiver(t *testing.T, healthy bool) *flakyReceiver {
	rcv := &flakyReceiver{byID: map[string]int{}}
	rcv.recovered.Store(healthy)
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rcv.mu.Lock()
		rcv.byID[r.Header.Get("webhook-id")]++
		rcv.mu.Unlock()
		if !rcv.recovered.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "receiver is down")
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *flakyReceiver) count(id string) int {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return rcv.byID[id]
}

// The dlq and status commands, run in-process against a real relay whose
// receivers fail: they list, show, replay and report what the tables hold,
// with the documented exit codes and messages.
func TestDLQAndStatusCommands(t *testing.T) {
	ctx := context.Background()
	c := dlqCluster(t)
	url := pgtemp.NewDatabase(t, c)
	// The database URL comes from the environment, as in a sidecar.
	t.Setenv("OUTBOX_RELAY_DATABASE_URL", url)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := outboxrelay.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	down, up, globex := newFlakyReceiver(t, false), newFlakyReceiver(t, true), newFlakyReceiver(t, false)
	for _, ep := range []struct {
		id, tenant string
		rcv        *flakyReceiver
	}{{"ep_down", "acme", down}, {"ep_up", "acme", up}, {"ep_globex", "globex", globex}} {
		if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, breaker_cooldown_ms)
VALUES ($1, $2, $3, ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'], 100)`, ep.id, ep.tenant, ep.rcv.srv.URL); err != nil {
			t.Fatal(err)
		}
	}
	r, err := relay.New(relay.Config{
		DatabaseURL:   url,
		SlotName:      "dlq_cli",
		Publication:   "dlq_cli",
		AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		PollInterval:  50 * time.Millisecond,
		RetrySchedule: []time.Duration{0, 50 * time.Millisecond},
		RetryJitter:   -1,
		Workers:       4,
	})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("relay.Run: %v", err)
			}
		})
	}
	defer stop()
	waitFor(t, "relay to become active", func() bool { return r.State() == "active" })

	var acme, gx string
	if err := pool.QueryRow(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('acme', 'invoice.paid', '{"invoice": 7}') RETURNING id::text`).Scan(&acme); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('globex', 'user.created', '{"user": 9}') RETURNING id::text`).Scan(&gx); err != nil {
		t.Fatal(err)
	}
	state := func(id, ep string) string {
		var s string
		_ = pool.QueryRow(ctx, `SELECT state FROM relay.deliveries WHERE event_id = $1::uuid AND endpoint_id = $2`, id, ep).Scan(&s)
		return s
	}
	waitFor(t, "two dead letters and one success", func() bool {
		return state(acme, "ep_down") == "dead" && state(acme, "ep_up") == "succeeded" && state(gx, "ep_globex") == "dead"
	})

	cli := func(wantCode int, args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		code := run(ctx, args, strings.NewReader(""), &stdout, &stderr)
		if code != wantCode {
			t.Fatalf("outbox-relay %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, &stdout, &stderr)
		}
		return stdout.String() + stderr.String()
	}
	// Tables are aligned with spaces; compare with runs of spaces as one.
	squeeze := func(s string) string { return strings.Join(strings.Fields(s), " ") }
	has := func(out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(squeeze(out), squeeze(w)) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}
	lacks := func(out string, unwanted ...string) {
		t.Helper()
		for _, u := range unwanted {
			if strings.Contains(out, u) {
				t.Errorf("output has %q:\n%s", u, out)
			}
		}
	}

	// list, with each filter.
	out := cli(0, "dlq", "list")
	has(out, "EVENT", "REASON", acme, gx, "ep_down", "ep_globex", "attempts exhausted (2)", "receiver is down", "503")
	lacks(out, "ep_up")
	out = cli(0, "dlq", "list", "--endpoint", "ep_down")
	has(out, acme)
	lacks(out, gx)
	out = cli(0, "dlq", "list", "--tenant=globex")
	has(out, gx)
	lacks(out, acme)
	has(cli(0, "dlq", "list", "--since", "1h", "--limit", "1"), "showing the newest 1")
	has(cli(0, "dlq", "list", "--until", "1h"), "no dead letters")
	has(cli(2, "dlq", "list", "--since", "yesterday"), "neither a time")

	// show, by webhook-id, with the attempt history.
	out = cli(0, "dlq", "show", dlq.WebhookID(acme))
	has(out, "webhook-id", dlq.WebhookID(acme), "ep_down", "dead", "receiver is down", "http status 503",
		`{"invoice": 7}`, "failed attempts:", "#1", "#2", "http_5xx")
	lacks(out, "ep_up")
	has(cli(0, "dlq", "show", "--endpoint", "ep_globex", gx), gx, `{"user": 9}`)
	has(cli(1, "dlq", "show", acme, "--endpoint", "ep_up"), "is succeeded, not a dead letter")
	unknown := "0190a5d2-7c1e-7a3b-9f00-1234567890ab"
	has(cli(1, "dlq", "show", unknown, "--endpoint", "ep_down"), "no delivery for event "+unknown+" at endpoint ep_down")
	has(cli(1, "dlq", "show", unknown), "no dead letter for event "+unknown)
	has(cli(2, "dlq", "show", "not-an-id"), "invalid event id")
	has(cli(2, "dlq", "show"), "needs one event id")

	// status: every endpoint of the event, in any state.
	out = cli(0, "status", dlq.WebhookID(acme))
	has(out, "event "+acme, "2 deliveries", "ep_down", "dead", "ep_up", "succeeded", "http status 204", "#2", "replays 0")
	has(cli(1, "status", unknown), "no delivery for event "+unknown)

	// replay: argument errors first, then one entry, then all.
	has(cli(2, "dlq", "replay", acme), "--endpoint is required")
	has(cli(2, "dlq", "replay", acme, "--endpoint", "ep_down", "--all"), "not both")
	has(cli(2, "dlq", "replay", acme, "--endpoint", "ep_down", "--tenant", "acme"), "only apply with --all")
	has(cli(1, "dlq", "replay", unknown, "--endpoint", "ep_down"), "no delivery for event "+unknown+" at endpoint ep_down")
	has(cli(1, "dlq", "replay", acme, "--endpoint", "ep_up"), "not a dead letter")

	down.recovered.Store(true)
	globex.recovered.Store(true)
	has(cli(0, "dlq", "replay", dlq.WebhookID(acme), "--endpoint", "ep_down"), "replayed event "+acme+" at endpoint ep_down", dlq.WebhookID(acme))
	waitFor(t, "the replayed delivery to succeed", func() bool { return state(acme, "ep_down") == "succeeded" })
	has(cli(1, "dlq", "replay", acme, "--endpoint", "ep_down"), "not a dead letter")
	has(cli(0, "dlq", "replay", "--all", "--tenant", "globex"), "replayed 1 delivery", "tenant globex")
	waitFor(t, "the globex delivery to succeed", func() bool { return state(gx, "ep_globex") == "succeeded" })
	has(cli(0, "dlq", "replay", "--all"), "replayed 0 deliveries (every dead letter)")
	has(cli(0, "dlq", "list"), "no dead letters")
	out = cli(0, "status", acme)
	has(out, "ep_down", "succeeded", "replays 1, last at", "#2", "-- replayed at")

	stop()
	for _, c := range []struct {
		rcv  *flakyReceiver
		id   string
		want int
	}{{down, acme, 3}, {up, acme, 1}, {globex, gx, 3}} {
		if got := c.rcv.count(dlq.WebhookID(c.id)); got != c.want {
			t.Errorf("receiver got %s %d times, want %d", c.id, got, c.want)
		}
	}

	// Help documents every flag, with its environment variable.
	out = cli(0, "dlq", "replay", "--help")
	has(out, "--all", "--endpoint", "--tenant", "--since", "--until", "--limit", "--database-url", "OUTBOX_RELAY_DATABASE_URL")
	has(cli(0, "dlq", "--help"), "list", "show", "replay")
	has(cli(2, "dlq"), "Usage: outbox-relay dlq")
	has(cli(2, "dlq", "bogus"), `unknown command "bogus"`)
	has(cli(0, "status", "--help"), "--database-url")
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
