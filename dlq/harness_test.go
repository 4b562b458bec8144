package dlq_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/internal/relaytest"
	"github.com/outbox-relay/outbox-relay/relay"
)

var cluster *pgtemp.Cluster

func TestMain(m *testing.M) { relaytest.Main(m, &cluster) }

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

// env is one database with the schema (see relaytest).
type env struct{ *relaytest.Env }

func newEnv(t *testing.T) *env { return &env{relaytest.New(t, cluster, "dlq")} }

// addEndpoint adds an endpoint whose circuit breaker, once open after the
// receiver's failures, lets a probe through after 100ms rather than 30s.
func (e *env) addEndpoint(id, tenant string, rcv *receiver) {
	e.T.Helper()
	e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets, breaker_cooldown_ms) VALUES ($1, $2, $3, ARRAY[$4], 100)`,
		id, tenant, rcv.srv.URL+"/hook", rcv.secret)
}

// publish inserts an event and returns its id.
func (e *env) publish(tenant, typ string) string {
	e.T.Helper()
	var id string
	if err := e.Pool.QueryRow(context.Background(),
		`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ($1, $2, '{"n": 1}') RETURNING id::text`,
		tenant, typ).Scan(&id); err != nil {
		e.T.Fatal(err)
	}
	return id
}

// startRelay runs a relay with a compressed retry schedule (the length of
// schedule is the attempt budget) until stop or the end of the test. stop
// returns when the relay has finished every attempt it started.
func (e *env) startRelay(schedule ...time.Duration) (stop func()) {
	e.T.Helper()
	r, err := relay.New(relay.Config{
		DatabaseURL:   e.URL,
		SlotName:      e.Slot,
		Publication:   e.Slot,
		AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		PollInterval:  50 * time.Millisecond,
		RetrySchedule: schedule,
		RetryJitter:   -1,
		Workers:       4,
	})
	if err != nil {
		e.T.Fatal(err)
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
					e.T.Errorf("relay.Run: %v", err)
				}
			case <-time.After(30 * time.Second):
				e.T.Error("relay did not stop within 30s")
			}
		})
	}
	e.T.Cleanup(stop)
	e.WaitFor("relay to become active", 20*time.Second, func() bool { return r.State() == "active" })
	return stop
}

func (e *env) state(eventID, endpointID string) string {
	e.T.Helper()
	var s string
	if err := e.Pool.QueryRow(context.Background(), `SELECT state FROM relay.deliveries WHERE event_id = $1::uuid AND endpoint_id = $2`,
		eventID, endpointID).Scan(&s); err != nil {
		return "none"
	}
	return s
}
