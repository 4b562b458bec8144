package relay

import (
	"context"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/relaytest"
)

// 429 with Retry-After waits at least that long, even when the schedule
// says sooner.
func TestRetryAfterIsHonoured(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	rcv.answer = func(n int, _ *http.Request) int {
		if n == 0 {
			return http.StatusTooManyRequests
		}
		return 200
	}
	retryAfter := rcv.srv.Config.Handler
	rcv.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "1")
		retryAfter.ServeHTTP(w, r)
	})
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(nil) // schedule 0, 50ms, ...
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("success", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 1
	})
	reqs := rcv.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d attempts, want 2", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < time.Second {
		t.Errorf("retried %s after a 429 with Retry-After: 1", gap)
	}
}

// A receiver that hangs past the endpoint's timeout, and one that resets
// the connection, are retried; the attempt rows name the class.
func TestTimeoutsAndResetsRetry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	slow, reset := newReceiver(t), newReceiver(t)
	slow.answer = func(n int, _ *http.Request) int {
		if n == 0 {
			time.Sleep(600 * time.Millisecond)
		}
		return 200
	}
	var answered atomic.Bool
	inner := reset.srv.Config.Handler
	reset.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !answered.Swap(true) {
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
			return
		}
		inner.ServeHTTP(w, r)
	})
	e.addEndpoint("slow", "t", slow)
	e.addEndpoint("reset", "t", reset)
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 200 WHERE id = 'slow'`)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("both succeeded", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded' AND attempts = 2`) == 2
	})
	if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE endpoint_id = 'slow' AND error_class = 'timeout'`); n != 1 {
		t.Errorf("%d timeout attempt rows for the slow receiver, want 1", n)
	}
	if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE endpoint_id = 'reset' AND error_class IN ('connection_reset', 'eof')`); n != 1 {
		t.Errorf("%d reset attempt rows, want 1", n)
	}
}

// TLS is verified: a receiver with a certificate nobody trusts fails (and
// is retried); with its CA in RootCAs it succeeds.
func TestTLSVerification(t *testing.T) {
	t.Parallel()
	got := make(chan struct{}, 10)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		got <- struct{}{}
		w.WriteHeader(204)
	}))
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	for _, trusted := range []bool{false, true} {
		e := newEnv(t)
		rcv := newReceiver(t) // only for its secret
		e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('tls', 't', $1, ARRAY[$2])`, srv.URL, rcv.secret)
		_, stop := e.startRelay(func(c *Config) {
			c.RetrySchedule = []time.Duration{0}
			if trusted {
				c.RootCAs = pool
			}
		})
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
		want := map[bool]string{false: "dead", true: "succeeded"}[trusted]
		e.WaitFor(want, 20*time.Second, func() bool {
			return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = $1`, want) == 1
		})
		if !trusted {
			if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE error_class = 'tls'`); n != 1 {
				t.Errorf("untrusted certificate: %d tls attempt rows, want 1", n)
			}
		}
		stop()
	}
	if len(got) != 1 {
		t.Errorf("the TLS receiver handled %d requests, want 1 (the trusted one)", len(got))
	}
}

// An answer that is not HTTP as framed (garbage, a conflicting length)
// fails the attempt with a reason that says so, is retried, and the
// delivery ends dead with that reason when attempts run out; the relay
// goes on delivering to a sound receiver beside it. Both clients.
func TestMalformedAnswersGetAClearError(t *testing.T) {
	t.Parallel()
	for _, client := range []string{HTTPClientLean, HTTPClientNetHTTP} {
		t.Run(client, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			fine := newReceiver(t)
			e.addEndpoint("fine", "t", fine)
			for id, answer := range map[string]string{
				"garbage": "garbage\r\n\r\n",
				"lengths": "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
			} {
				srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
					io.WriteString(c, answer)
					return false
				})
				e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ($1, 't', $2, ARRAY[$3])`,
					id, srv.URL()+"hook", fine.secret)
			}
			e.startRelay(func(c *Config) {
				c.HTTPClient = client
				c.RetrySchedule = []time.Duration{0, 10 * time.Millisecond}
			})
			e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
			e.WaitFor("both bad receivers dead, the sound one succeeded", 20*time.Second, func() bool {
				return e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id IN ('garbage', 'lengths') AND state = 'dead' AND attempts = 2`) == 2 &&
					e.Count(`SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'fine' AND state = 'succeeded'`) == 1
			})
			// What each reason must name (both clients word it so).
			for id, names := range map[string]string{"garbage": "malformed", "lengths": "Content-Length"} {
				var reason string
				if err := e.Pool.QueryRow(context.Background(), `SELECT error FROM relay.deliveries WHERE endpoint_id = $1`, id).Scan(&reason); err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(reason, names) || !strings.Contains(reason, "attempts exhausted (2)") {
					t.Errorf("%s: error %q, want attempts exhausted and %q named", id, reason, names)
				}
			}
		})
	}
}
