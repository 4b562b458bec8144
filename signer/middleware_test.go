package signer_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

// receiver is a real HTTP server whose handler, behind the middleware,
// records what reached it.
type receiver struct {
	srv    *httptest.Server
	mu     sync.Mutex
	bodies [][]byte
}

func newReceiver(t *testing.T, v *signer.Verifier) *receiver {
	t.Helper()
	rcv := &receiver{}
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if r.ContentLength != int64(len(body)) {
			http.Error(w, "content length mismatch", http.StatusInternalServerError)
			return
		}
		rcv.mu.Lock()
		rcv.bodies = append(rcv.bodies, body)
		rcv.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	rcv.srv = httptest.NewServer(signer.Middleware(v, next))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *receiver) received() [][]byte {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return append([][]byte(nil), rcv.bodies...)
}

// post sends body with h using a real client; chunked hides the length.
func post(t *testing.T, url string, h http.Header, body []byte, chunked bool) (int, string) {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // not a *bytes.Reader: the client cannot know the length
	}
	req, err := http.NewRequest(http.MethodPost, url, r)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	req.Header.Set("Content-Type", "application/json")
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	defer resp.Body.Close()
	text, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(text)
}

func TestMiddleware(t *testing.T) {
	t.Parallel()
	sec := testSecret(t, 4)
	now := time.Now()
	v := &signer.Verifier{Secrets: []signer.Secret{sec}, MaxBodyBytes: 64 << 10}
	rcv := newReceiver(t, v)
	body := []byte(`{"type":"order.created","id":42}`)
	sign := func(b []byte) http.Header {
		return headers("msg_mw", now.Unix(), signer.Sign("msg_mw", now, b, sec))
	}

	// A good request reaches the handler with the body intact.
	if code, text := post(t, rcv.srv.URL, sign(body), body, false); code != http.StatusNoContent {
		t.Fatalf("valid request: status %d %q, want 204", code, text)
	}
	if got := rcv.received(); len(got) != 1 || !bytes.Equal(got[0], body) {
		t.Fatalf("handler received %q, want exactly [%q]", got, body)
	}

	big := bytes.Repeat([]byte("a"), 64<<10+1)
	atLimit := big[:64<<10]
	tests := []struct {
		name     string
		h        http.Header
		body     []byte
		chunked  bool
		wantCode int
		wantText string
	}{
		{"tampered body", sign(body), []byte(`{"type":"order.created","id":43}`), false, http.StatusUnauthorized, "no matching webhook signature"},
		{"wrong secret", headers("msg_mw", now.Unix(), signer.Sign("msg_mw", now, body, testSecret(t, 5))), body, false, http.StatusUnauthorized, "no matching webhook signature"},
		{"no headers", http.Header{}, body, false, http.StatusUnauthorized, "missing webhook headers"},
		{"stale", headers("msg_mw", now.Add(-time.Hour).Unix(), signer.Sign("msg_mw", now.Add(-time.Hour), body, sec)), body, false, http.StatusUnauthorized, "too old"},
		{"too large, with Content-Length", sign(big), big, false, http.StatusRequestEntityTooLarge, "limit is 65536 bytes"},
		{"too large, chunked", sign(big), big, true, http.StatusRequestEntityTooLarge, "limit is 65536 bytes"},
	}
	for _, tt := range tests {
		code, text := post(t, rcv.srv.URL, tt.h, tt.body, tt.chunked)
		if code != tt.wantCode || !strings.Contains(text, tt.wantText) {
			t.Errorf("%s: status %d %q, want %d and a reason mentioning %q", tt.name, code, text, tt.wantCode, tt.wantText)
		}
	}
	if n := len(rcv.received()); n != 1 {
		t.Errorf("handler ran %d times, want 1: rejected requests reached it", n)
	}

	// Exactly at the limit is fine, chunked or not.
	for _, chunked := range []bool{false, true} {
		if code, text := post(t, rcv.srv.URL, sign(atLimit), atLimit, chunked); code != http.StatusNoContent {
			t.Errorf("body at the limit (chunked=%v): status %d %q, want 204", chunked, code, text)
		}
	}
	if got := rcv.received(); len(got) != 3 || !bytes.Equal(got[2], atLimit) {
		t.Errorf("handler got %d bodies, want 3 with the last one intact", len(got))
	}
}

func TestMiddlewareDefaultLimitIsOneMiB(t *testing.T) {
	t.Parallel()
	sec := testSecret(t, 6)
	rcv := newReceiver(t, &signer.Verifier{Secrets: []signer.Secret{sec}})
	now := time.Now()
	for _, c := range []struct {
		size int
		want int
	}{{1 << 20, http.StatusNoContent}, {1<<20 + 1, http.StatusRequestEntityTooLarge}} {
		body := bytes.Repeat([]byte("z"), c.size)
		h := headers("msg_"+strconv.Itoa(c.size), now.Unix(), signer.Sign("msg_"+strconv.Itoa(c.size), now, body, sec))
		if code, text := post(t, rcv.srv.URL, h, body, true); code != c.want {
			t.Errorf("%d-byte body: status %d %q, want %d", c.size, code, text, c.want)
		}
	}
}

// TestMiddlewareCopiesVerifier: changing the Verifier after building the
// handler does not change what it accepts.
func TestMiddlewareCopiesVerifier(t *testing.T) {
	t.Parallel()
	sec, other := testSecret(t, 7), testSecret(t, 8)
	v := &signer.Verifier{Secrets: []signer.Secret{sec}}
	rcv := newReceiver(t, v)
	v.Secrets[0] = other
	now := time.Now()
	body := []byte("{}")
	if code, text := post(t, rcv.srv.URL, headers("m", now.Unix(), signer.Sign("m", now, body, sec)), body, false); code != http.StatusNoContent {
		t.Errorf("status %d %q, want 204 with the secret the handler was built with", code, text)
	}
}

func TestMiddlewarePanicsOnBadConfig(t *testing.T) {
	t.Parallel()
	ok := http.NotFoundHandler()
	for name, f := range map[string]func(){
		"no secrets":   func() { signer.Middleware(&signer.Verifier{}, ok) },
		"nil verifier": func() { signer.Middleware(nil, ok) },
		"nil next":     func() { signer.Middleware(&signer.Verifier{Secrets: []signer.Secret{testSecret(t, 1)}}, nil) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: Middleware did not panic", name)
				}
			}()
			f()
		}()
	}
}
