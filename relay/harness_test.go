package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
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
	"github.com/outbox-relay/outbox-relay/signer"
)

var cluster *pgtemp.Cluster

func TestMain(m *testing.M) { relaytest.Main(m, &cluster) }

// received is one request a test receiver saw.
type received struct {
	id, ts, sig string
	header      http.Header
	body        []byte
	verifyErr   error
	at          time.Time
}

// receiver is a real HTTP server on loopback whose answers a test scripts.
type receiver struct {
	srv    *httptest.Server
	secret string
	sec    signer.Secret

	mu     sync.Mutex
	got    []received
	answer func(n int, r *http.Request) int // status for the n-th request (0-based); nil = 200
	notify chan struct{}

	active, peak atomic.Int32 // requests being handled now, and the most at once
}

func newReceiver(t *testing.T) *receiver {
	t.Helper()
	key := make([]byte, 24)
	rand.Read(key)
	rcv := &receiver{secret: "whsec_" + base64.StdEncoding.EncodeToString(key), notify: make(chan struct{}, 1)}
	var err error
	if rcv.sec, err = signer.ParseSecret(rcv.secret); err != nil {
		t.Fatal(err)
	}
	verifier := &signer.Verifier{Secrets: []signer.Secret{rcv.sec}}
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		now := rcv.active.Add(1)
		defer rcv.active.Add(-1)
		for p := rcv.peak.Load(); now > p && !rcv.peak.CompareAndSwap(p, now); p = rcv.peak.Load() {
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body)) // answer may read it again
		rec := received{id: r.Header.Get("webhook-id"), ts: r.Header.Get("webhook-timestamp"),
			sig: r.Header.Get("webhook-signature"), header: r.Header.Clone(), body: body, at: time.Now()}
		rec.verifyErr = verifier.Verify(r.Header, body)
		rcv.mu.Lock()
		n := len(rcv.got)
		rcv.got = append(rcv.got, rec)
		answer := rcv.answer
		rcv.mu.Unlock()
		select {
		case rcv.notify <- struct{}{}:
		default:
		}
		status := 200
		if answer != nil {
			status = answer(n, r)
		}
		w.WriteHeader(status)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *receiver) requests() []received {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return append([]received(nil), rcv.got...)
}

// env is one isolated database with the schema (see relaytest).
type env struct{ *relaytest.Env }

func newEnv(t *testing.T) *env { return &env{relaytest.New(t, cluster, "t")} }

func (e *env) addEndpoint(id, tenant string, rcv *receiver, types ...string) {
	e.T.Helper()
	var et any
	if len(types) > 0 {
		et = types
	}
	e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets, event_types) VALUES ($1, $2, $3, ARRAY[$4], $5)`,
		id, tenant, rcv.srv.URL+"/hook", rcv.secret, et)
}

// startRelay runs a relay against the env until the test ends.
func (e *env) startRelay(mod func(*Config)) (*Relay, func()) {
	e.T.Helper()
	cfg := Config{
		DatabaseURL:   e.URL,
		SlotName:      e.Slot,
		Publication:   e.Slot,
		AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		PollInterval:  50 * time.Millisecond,
		RetrySchedule: []time.Duration{0, 50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond},
		RetryJitter:   -1,
		Workers:       8,
	}
	if testing.Verbose() {
		cfg.Logger = testLogger(e.T)
	}
	if mod != nil {
		mod(&cfg)
	}
	r, err := New(cfg)
	if err != nil {
		e.T.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop := func() {
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
	return r, stop
}
