package netguard

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/retrypolicy"
)

// newReceiver starts a real HTTP server on 127.0.0.1 that counts requests.
func newReceiver(t *testing.T) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func guardedClient(g *Guard) *http.Client {
	return &http.Client{Transport: g.Transport(5 * time.Second), Timeout: 10 * time.Second}
}

func TestHTTPLoopbackBlocked(t *testing.T) {
	t.Parallel()
	srv, hits := newReceiver(t)
	c := guardedClient(&Guard{})
	defer c.CloseIdleConnections()

	resp, err := c.Post(srv.URL, "application/json", strings.NewReader(`{}`))
	if err == nil {
		resp.Body.Close()
		t.Fatalf("POST %s succeeded with status %d, want blocked", srv.URL, resp.StatusCode)
	}
	var be *BlockedError
	if !errors.As(err, &be) {
		t.Fatalf("error %v (%T) does not unwrap to *BlockedError", err, err)
	}
	if be.Rule != "loopback 127.0.0.0/8" || be.Addr != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("blocked {%s, %q}, want {127.0.0.1, loopback 127.0.0.0/8}", be.Addr, be.Rule)
	}
	var r interface{ Retryable() bool }
	if !errors.As(err, &r) || r.Retryable() {
		t.Errorf("client error must carry Retryable() == false through the wrapping")
	}
	if d := retrypolicy.Classify(0, nil, err); d.Outcome != retrypolicy.Fail || d.Class != "blocked" ||
		!strings.HasSuffix(d.Reason, be.Error()) {
		t.Errorf("retrypolicy.Classify = %+v, want a final Fail of class blocked naming the rule", d)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("receiver got %d requests, want 0", n)
	}
}

func TestHTTPLoopbackAllowlisted(t *testing.T) {
	t.Parallel()
	srv, hits := newReceiver(t)
	c := guardedClient(&Guard{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	defer c.CloseIdleConnections()

	resp, err := c.Post(srv.URL, "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatalf("POST with 127.0.0.0/8 allowlisted: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status %d, want 200", resp.StatusCode)
	}
	if n := hits.Load(); n != 1 {
		t.Errorf("receiver got %d requests, want 1", n)
	}
}

// TestHTTPHostnameCheckedAfterResolution dials by host name: the guard never
// sees "localhost", only the addresses it resolves to, so a name cannot be
// used to smuggle a blocked address past it (the same path catches DNS
// rebinding, since the check runs on every dial).
func TestHTTPHostnameCheckedAfterResolution(t *testing.T) {
	t.Parallel()
	addrs, err := net.DefaultResolver.LookupNetIP(t.Context(), "ip", "localhost")
	if err != nil || len(addrs) == 0 {
		t.Skipf("localhost does not resolve here: %v", err)
	}
	srv, hits := newReceiver(t)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = net.JoinHostPort("localhost", u.Port())

	t.Run("blocked", func(t *testing.T) {
		c := guardedClient(&Guard{})
		defer c.CloseIdleConnections()
		resp, err := c.Get(u.String())
		if err == nil {
			resp.Body.Close()
			t.Fatalf("GET %s succeeded, want blocked", u)
		}
		var be *BlockedError
		if !errors.As(err, &be) {
			t.Fatalf("error %v does not unwrap to *BlockedError", err)
		}
		if !be.Addr.IsLoopback() || !strings.Contains(be.Rule, "loopback") {
			t.Errorf("blocked {%s, %q}, want a resolved loopback address and rule", be.Addr, be.Rule)
		}
		if n := hits.Load(); n != 0 {
			t.Errorf("receiver got %d requests, want 0", n)
		}
	})

	t.Run("allowlisted", func(t *testing.T) {
		// Only the IPv4 loopback is allowed; if localhost also resolves to
		// ::1, that attempt is refused and the dialer falls back to
		// 127.0.0.1, where the receiver listens.
		c := guardedClient(&Guard{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
		defer c.CloseIdleConnections()
		resp, err := c.Get(u.String())
		if err != nil {
			t.Fatalf("GET %s with 127.0.0.0/8 allowlisted: %v", u, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200", resp.StatusCode)
		}
	})
}

func TestDialContextAndNewDialer(t *testing.T) {
	t.Parallel()
	srv, _ := newReceiver(t)
	addr := srv.Listener.Addr().String()
	g := &Guard{}
	var be *BlockedError
	if _, err := g.DialContext(t.Context(), "tcp", addr); !errors.As(err, &be) {
		t.Errorf("DialContext(%s) = %v, want *BlockedError", addr, err)
	}
	if _, err := g.NewDialer(time.Second).Dial("tcp", addr); !errors.As(err, &be) {
		t.Errorf("NewDialer().Dial(%s) = %v, want *BlockedError", addr, err)
	}
	open := &Guard{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}
	conn, err := open.DialContext(t.Context(), "tcp", addr)
	if err != nil {
		t.Fatalf("allowlisted DialContext: %v", err)
	}
	conn.Close()
}

func TestTransportIgnoresProxy(t *testing.T) {
	t.Parallel()
	if (&Guard{}).Transport(0).Proxy != nil {
		t.Errorf("Transport().Proxy is set; a proxy would bypass the guard")
	}
}
