package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/relaytest"
	"github.com/outbox-relay/outbox-relay/internal/retrypolicy"
)

func newTransport() *Transport {
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &Transport{Dial: d.DialContext}
}

func post(t *testing.T, tr *Transport, ctx context.Context, url, body string, header http.Header) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return nil, nil, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b, err
}

// countingServer is a net/http server that counts the connections it
// accepted.
func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &conns
}

// The request arrives as sent, and one connection carries every request.
func TestRequestsArriveIntactOverOneConnection(t *testing.T) {
	type seen struct {
		method, uri, host, auth, sig, ctype string
		length                              int64
		body                                string
	}
	var mu sync.Mutex
	var got []seen
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, seen{r.Method, r.RequestURI, r.Host, r.Header.Get("Authorization"), r.Header.Get("Webhook-Signature"),
			r.Header.Get("Content-Type"), r.ContentLength, string(b)})
		mu.Unlock()
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(202)
		io.WriteString(w, "accepted")
	})
	tr := newTransport()
	defer tr.CloseIdleConnections()
	url := strings.Replace(srv.URL, "http://", "http://user:pa%3Ass@", 1) + "/hooks/in?x=1&y=%20z"
	for i := range 100 {
		body := strings.Repeat("b", i*37)
		resp, b, err := post(t, tr, context.Background(), url, body, http.Header{
			"Webhook-Signature": {"v1,abc"}, "Content-Type": {"application/json"},
		})
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if resp.StatusCode != 202 || resp.Status != "202 Accepted" || string(b) != "accepted" || resp.Header.Get("Retry-After") != "7" {
			t.Fatalf("request %d: status %q body %q retry-after %q", i, resp.Status, b, resp.Header.Get("Retry-After"))
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 100 sequential requests, want 1", n)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 100 {
		t.Fatalf("server saw %d requests, want 100", len(got))
	}
	for i, s := range got {
		want := seen{"POST", "/hooks/in?x=1&y=%20z", strings.TrimPrefix(srv.URL, "http://"), "Basic dXNlcjpwYTpzcw==", "v1,abc",
			"application/json", int64(i * 37), strings.Repeat("b", i*37)}
		if s != want {
			t.Fatalf("request %d arrived as %+v, want %+v", i, s, want)
		}
	}
}

func TestAnswerFraming(t *testing.T) {
	cases := []struct {
		name   string
		answer string
		body   string
		reuse  bool // the next request goes over the same connection
	}{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "hello", true},
		{"empty", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "", true},
		{"no reason phrase", "HTTP/1.1 204\r\n\r\n", "", true},
		{"chunked with trailers", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", "hello world", true},
		{"1xx first", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "ok", true},
		{"connection close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", "ok", false},
		{"HTTP/1.0 keep-alive", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", "ok", true},
		{"bare LF", "HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "ok", true},
		{"304 ignores its length", "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", "", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var answered atomic.Int64
			srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
				if answered.Add(1) == 1 {
					io.WriteString(c, tc.answer)
					return true
				}
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
				return true
			})
			tr := newTransport()
			defer tr.CloseIdleConnections()
			_, b, err := post(t, tr, context.Background(), srv.URL(), "{}", nil)
			if err != nil || string(b) != tc.body {
				t.Fatalf("first answer: body %q, error %v; want %q", b, err, tc.body)
			}
			_, b, err = post(t, tr, context.Background(), srv.URL(), "{}", nil)
			if err != nil || string(b) != "next" {
				t.Fatalf("second answer: body %q, error %v", b, err)
			}
			want := int64(1)
			if !tc.reuse {
				want = 2
			}
			if n := srv.Conns.Load(); n != want {
				t.Errorf("%d connections, want %d", n, want)
			}
		})
	}
}

// A body that runs until the server closes is read to its end; the
// connection is not reused.
// The answer to a HEAD has no body, whatever its Content-Length says.
func TestHeadHasNoBody(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "a body HEAD leaves out") })
	tr := newTransport()
	defer tr.CloseIdleConnections()
	for _, method := range []string{http.MethodHead, http.MethodGet} {
		req, _ := http.NewRequest(method, srv.URL, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		want := map[string]string{http.MethodHead: "", http.MethodGet: "a body HEAD leaves out"}[method]
		if err != nil || string(b) != want {
			t.Errorf("%s: body %q, error %v; want %q", method, b, err, want)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

func TestBodyUntilClose(t *testing.T) {
	srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
		io.WriteString(c, "HTTP/1.0 200 OK\r\n\r\nall of it")
		return false
	})
	tr := newTransport()
	for range 2 {
		_, b, err := post(t, tr, context.Background(), srv.URL(), "{}", nil)
		if err != nil || string(b) != "all of it" {
			t.Fatalf("body %q, error %v", b, err)
		}
	}
	if n := srv.Conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

// A server that closes a kept-alive connection while it is idle: the
// next request goes over a new connection without failing, and the server
// sees it once.
func TestIdleConnectionClosedByServer(t *testing.T) {
	srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return false // closes without saying so
	})
	tr := newTransport()
	defer tr.CloseIdleConnections()
	for i := range 3 {
		if i > 0 {
			time.Sleep(20 * time.Millisecond) // the FIN arrives
		}
		if _, b, err := post(t, tr, context.Background(), srv.URL(), "{}", nil); err != nil || string(b) != "ok" {
			t.Fatalf("request %d: body %q, error %v", i, b, err)
		}
	}
	if n := srv.Reqs.Load(); n != 3 {
		t.Errorf("server read %d requests, want 3", n)
	}
	if n := srv.Conns.Load(); n != 3 {
		t.Errorf("%d connections, want 3", n)
	}
}

// A receiver that never answers: the deadline ends the attempt, it is a
// timeout, and the request is not sent a second time.
func TestHangingReceiverTimesOutOnce(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	srv := relaytest.NewScripted(t, func(c net.Conn, n int) bool {
		if n == 0 {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
			return true
		}
		<-release
		return false
	})
	tr := newTransport()
	defer tr.CloseIdleConnections()
	if _, _, err := post(t, tr, context.Background(), srv.URL(), "{}", nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, err := post(t, tr, ctx, srv.URL(), "{}", nil) // over the kept-alive connection
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %s to time out at 150ms", took)
	}
	if class := retrypolicy.ErrorClass(err); class != "timeout" {
		t.Errorf("error %v: class %q, want timeout", err, class)
	}
	time.Sleep(50 * time.Millisecond)
	if n := srv.Reqs.Load(); n != 2 {
		t.Errorf("server read %d requests, want 2 (no resend after a timeout)", n)
	}
}

func TestCancelEndsAWait(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	srv := relaytest.NewScripted(t, func(net.Conn, int) bool { <-release; return false })
	tr := newTransport()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, _, err := post(t, tr, ctx, srv.URL(), "{}", nil)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v, want context.Canceled", err)
	}
}

func TestBadAnswers(t *testing.T) {
	cases := []struct {
		name, answer, class string
		bodyErr             bool // the head parses; reading the body fails
	}{
		{"garbage", "garbage\r\n\r\n", "other", false},
		{"HTTP/2 status line", "HTTP/2 200 OK\r\n\r\n", "other", false},
		{"bad status code", "HTTP/1.1 2x0 OK\r\n\r\n", "other", false},
		{"bad header line", "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "other", false},
		{"signed length", "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", "other", false},
		{"signed chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n", "other", true},
		{"conflicting lengths", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "other", false},
		{"unsupported transfer-encoding", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "other", false},
		{"headers too long", "HTTP/1.1 200 OK\r\nX-Long: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", "other", false},
		{"closed mid-head", "HTTP/1.1 200 OK\r\nContent-Len", "eof", false},
		{"short body", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "eof", true},
		{"bad chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "other", true},
		{"switching protocols", "HTTP/1.1 101 Switching Protocols\r\n\r\n", "other", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
				io.WriteString(c, tc.answer)
				return false
			})
			tr := newTransport()
			resp, _, err := post(t, tr, context.Background(), srv.URL(), "{}", nil)
			if err == nil {
				t.Fatalf("no error; status %d", resp.StatusCode)
			}
			if class := retrypolicy.ErrorClass(err); class != tc.class {
				t.Errorf("error %v: class %q, want %q", err, class, tc.class)
			}
			if resp != nil != tc.bodyErr {
				t.Errorf("error %v: response returned %v, want %v", err, resp != nil, tc.bodyErr)
			}
			if n := srv.Reqs.Load(); n != 1 {
				t.Errorf("server read %d requests, want 1", n)
			}
		})
	}
}

// A reset before any answer on a new connection fails the request; it is
// not sent again.
func TestResetOnNewConnectionIsNotResent(t *testing.T) {
	srv := relaytest.NewScripted(t, func(c net.Conn, _ int) bool {
		c.(*net.TCPConn).SetLinger(0)
		return false
	})
	tr := newTransport()
	_, _, err := post(t, tr, context.Background(), srv.URL(), "{}", nil)
	if class := retrypolicy.ErrorClass(err); class != "connection_reset" && class != "eof" {
		t.Errorf("error %v: class %q, want connection_reset or eof", err, class)
	}
	if n := srv.Reqs.Load(); n != 1 {
		t.Errorf("server read %d requests, want 1", n)
	}
}

// A body left unread closes its connection rather than corrupting the
// next answer.
func TestUnreadBodyClosesTheConnection(t *testing.T) {
	big := strings.Repeat("x", 100<<10)
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, big)
	})
	tr := newTransport()
	defer tr.CloseIdleConnections()
	for range 3 {
		req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("{}"))
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 10)
		if _, err := io.ReadFull(resp.Body, b); err != nil || string(b) != "xxxxxxxxxx" {
			t.Fatalf("read %q, %v", b, err)
		}
		resp.Body.Close()
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("%d connections, want 3", n)
	}
}

func TestInvalidRequestsAreNotSent(t *testing.T) {
	srv := relaytest.NewScripted(t, func(net.Conn, int) bool { return false })
	tr := newTransport()
	for _, h := range []http.Header{
		{"X-Bad": {"a\r\nInjected: yes"}},
		{"Bad Name": {"v"}},
		{"X-Nul": {"a\x00b"}},
	} {
		if _, _, err := post(t, tr, context.Background(), srv.URL(), "{}", h); err == nil {
			t.Errorf("header %v: no error", h)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, "https://example.com/", nil)
	if _, err := tr.RoundTrip(req); err == nil {
		t.Error("https:// URL: no error")
	}
	time.Sleep(20 * time.Millisecond)
	if n := srv.Conns.Load(); n != 0 {
		t.Errorf("%d connections opened for invalid requests", n)
	}
}

// Many goroutines share the transport (run with -race).
func TestConcurrentRequests(t *testing.T) {
	var total atomic.Int64
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		total.Add(int64(len(b)))
		w.Write(bytes.ToUpper(b))
	})
	tr := &Transport{Dial: (&net.Dialer{}).DialContext, MaxIdlePerHost: 8}
	defer tr.CloseIdleConnections()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				body := strings.Repeat(string(rune('a'+g%26)), 1+i)
				_, b, err := post(t, tr, context.Background(), srv.URL, body, nil)
				if err == nil && string(b) != strings.ToUpper(body) {
					err = errors.New("answer " + string(b) + " to " + body)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if want := int64(32 * (50 * 51 / 2)); total.Load() != want {
		t.Errorf("server read %d body bytes, want %d", total.Load(), want)
	}
	// At most 8 stay idle, so a sender may find none and dial while the
	// others' connections are busy: more than 32 connections in all is
	// allowed (54 in a slow -race run), but most requests reuse one.
	if n := conns.Load(); n > 32*50/4 || n < 1 {
		t.Errorf("%d connections for 1,600 requests from 32 concurrent senders: most should reuse one", n)
	}
	tr.mu.Lock()
	kept := tr.idle[strings.TrimPrefix(srv.URL, "http://")]
	idle := len(kept)
	for _, c := range kept {
		if _, plain := c.nc.(*net.TCPConn); plain && runtime.GOOS == "linux" {
			t.Errorf("a pooled connection is a bare %T, not read through sockio", c.nc)
		}
	}
	tr.mu.Unlock()
	if idle > 8 {
		t.Errorf("%d idle connections kept, MaxIdlePerHost is 8", idle)
	}
}

// Connections idle past IdleTimeout are closed, not reused.
func TestIdleTimeout(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
	tr := &Transport{Dial: (&net.Dialer{}).DialContext, IdleTimeout: 50 * time.Millisecond}
	defer tr.CloseIdleConnections()
	for i := range 2 {
		if i > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		if _, _, err := post(t, tr, context.Background(), srv.URL, "{}", nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2 (the first expired)", n)
	}
}

// A server that answers before reading the whole request and closes: its
// answer is returned, not the write's error.
func TestEarlyAnswerToAnUnreadBody(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil { // the head only
			c.Close()
			return
		}
		io.WriteString(c, "HTTP/1.1 413 Request Entity Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoo big!")
		c.(*net.TCPConn).CloseWrite()
		time.Sleep(200 * time.Millisecond)
		c.Close()
	}()
	tr := newTransport()
	resp, b, err := post(t, tr, context.Background(), "http://"+ln.Addr().String()+"/", strings.Repeat("x", 32<<20), nil)
	if err != nil {
		t.Fatalf("error %v, want the 413", err)
	}
	if resp.StatusCode != 413 || resp.Status != "413 Request Entity Too Large" || string(b) != "too big!" {
		t.Errorf("status %q, body %q", resp.Status, b)
	}
}

func TestStatusText(t *testing.T) {
	for line, want := range map[string]string{
		"HTTP/1.1 200 OK":                  "200 OK",
		"HTTP/1.1 200":                     "200",
		"HTTP/1.1 200 ":                    "200",
		"HTTP/1.1 200 Fine":                "200 Fine",
		"HTTP/1.0 503 Service Unavailable": "503 Service Unavailable",
		"HTTP/1.1 599 Whatever":            "599 Whatever",
	} {
		resp, _, err := parseStatusLine([]byte(line))
		if err != nil || resp.Status != want {
			t.Errorf("%q: status %q, error %v; want %q", line, resp.Status, err, want)
		}
	}
}

// Past MaxIdle over all hosts, the longest idle connection is closed.
func TestMaxIdleOverHosts(t *testing.T) {
	var srvs []*httptest.Server
	var conns []*atomic.Int64
	for range 6 {
		srv, n := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
		srvs, conns = append(srvs, srv), append(conns, n)
	}
	tr := &Transport{Dial: (&net.Dialer{}).DialContext, MaxIdle: 3}
	defer tr.CloseIdleConnections()
	send := func(i int) {
		if _, _, err := post(t, tr, context.Background(), srvs[i].URL, "{}", nil); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 6 {
		send(i)
	}
	tr.mu.Lock()
	idle, hosts := tr.lru.Len(), len(tr.idle)
	tr.mu.Unlock()
	if idle != 3 || hosts != 3 {
		t.Fatalf("%d idle connections over %d hosts, want 3 and 3", idle, hosts)
	}
	for i := 5; i >= 0; i-- { // 5, 4, 3 reuse theirs; 2, 1, 0 dial again
		send(i)
	}
	for i, n := range conns {
		want := int64(1)
		if i < 3 {
			want = 2
		}
		if n.Load() != want {
			t.Errorf("server %d: %d connections, want %d", i, n.Load(), want)
		}
	}
}

// Client sends http:// through Plain and https:// through Other.
func TestClientRoutesByScheme(t *testing.T) {
	plainSrv, plainConns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "plain") })
	tlsSrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls") }))
	defer tlsSrv.Close()
	tr := newTransport()
	c := &Client{Plain: tr, Other: tlsSrv.Client()}
	defer c.CloseIdleConnections()
	for url, want := range map[string]string{plainSrv.URL: "plain", tlsSrv.URL: "tls"} {
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader("{}"))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != want {
			t.Errorf("%s answered %q, want %q", url, b, want)
		}
	}
	tr.mu.Lock()
	pooled := tr.lru.Len()
	tr.mu.Unlock()
	if pooled != 1 || plainConns.Load() != 1 {
		t.Errorf("the plain transport holds %d idle connections after %d dials, want 1 and 1", pooled, plainConns.Load())
	}
	c.CloseIdleConnections()
	tr.mu.Lock()
	pooled = tr.lru.Len()
	tr.mu.Unlock()
	if pooled != 0 {
		t.Errorf("%d idle connections after CloseIdleConnections", pooled)
	}
}
