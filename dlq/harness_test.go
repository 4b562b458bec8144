package dlq_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/relay"
)

var cluster *pgtemp.Cluster

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtemp.WithCluster(m, &cluster),
		// The shared HTTP transport keeps idle connections.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// receiver is a real HTTP server on loopback that answers 500 with a body
// until recovered, then 200, and counts requests per webhook-id.
type receiver struct {
	srv       *httptest.Server
	secret    string
	recovered atomic.Bool

	mu   sync.Mutex
	byID map[string]int
	all  int
}

func newReceiver(t *testing.T) *receiver {
	t.Helper()
	rcv := &receiver{secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", byID: make(map[string]int)}
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rcv.mu.Lock()
		rcv.byID[r.Header.Get("webhook-id")]++
		rcv.all++
		rcv.mu.Unlock()
		if !rcv.recovered.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "down for maintenance")
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *receiver) count(webhookID string) int {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return rcv.byID[webhookID]
}

func (rcv *receiver) total() int {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return rcv.all
}

// env is one database with the schema, and a pool for the test.
type env struct {
	t    *testing.T
	url  string
	slot string
	pool *pgxpool.Pool
}

func newEnv(t *testing.T) *env {
	t.Helper()
	url := pgtemp.NewDatabase(t, cluster)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := outboxrelay.Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	suffix := make([]byte, 6)
	rand.Read(suffix)
	return &env{t: t, url: url, pool: pool, slot: fmt.Sprintf("dlq_%x", suffix)}
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) count(sql string, args ...any) int {
	e.t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// waitFor polls cond until it holds or the deadline passes.
func (e *env) waitFor(what string, timeout time.Duration, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// addEndpoint adds an endpoint whose circuit breaker, once open after the
// receiver's failures, lets a probe through after 100ms rather than 30s.
func (e *env) addEndpoint(id, tenant string, rcv *receiver) {
	e.t.Helper()
	e.exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets, breaker_cooldown_ms) VALUES ($1, $2, $3, ARRAY[$4], 100)`,
		id, tenant, rcv.srv.URL+"/hook", rcv.secret)
}

// publish inserts an event and returns its id.
func (e *env) publish(tenant, typ string) string {
	e.t.Helper()
	var id string
	if err := e.pool.QueryRow(context.Background(),
		`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ($1, $2, '{"n": 1}') RETURNING id::text`,
		tenant, typ).Scan(&id); err != nil {
		e.t.Fatal(err)
	}
	return id
}

// startRelay runs a relay with a compressed retry schedule (the length of
// schedule is the attempt budget) until stop or the end of the test. stop
// returns when the relay has finished every attempt it started.
func (e *env) startRelay(schedule ...time.Duration) (stop func()) {
	e.t.Helper()
	r, err := relay.New(relay.Config{
		DatabaseURL:   e.url,
		SlotName:      e.slot,
		Publication:   e.slot,
		AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		PollInterval:  50 * time.Millisecond,
		RetrySchedule: schedule,
		RetryJitter:   -1,
		Workers:       4,
	})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					e.t.Errorf("relay.Run: %v", err)
				}
			case <-time.After(30 * time.Second):
				e.t.Error("relay did not stop within 30s")
			}
		})
	}
	e.t.Cleanup(stop)
	e.waitFor("relay to become active", 20*time.Second, func() bool { return r.State() == "active" })
	return stop
}

func (e *env) state(eventID, endpointID string) string {
	e.t.Helper()
	var s string
	if err := e.pool.QueryRow(context.Background(), `SELECT state FROM relay.deliveries WHERE event_id = $1::uuid AND endpoint_id = $2`,
		eventID, endpointID).Scan(&s); err != nil {
		return "none"
	}
	return s
}
