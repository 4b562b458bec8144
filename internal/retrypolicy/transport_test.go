package retrypolicy

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// These tests classify errors produced by a real net/http client against
// real loopback servers, to show that the rules hold for what the relay
// will actually see, not only for hand-built error values.

func post(t *testing.T, c *http.Client, url string) (int, http.Header, error) {
	t.Helper()
	if c == nil {
		c = &http.Client{
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	resp, err := c.Post(url, "application/json", strings.NewReader(`{}`))
	if err != nil {
		return 0, nil, err
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header, nil
}

func TestClassifyRealTransport(t *testing.T) {
	t.Parallel()

	t.Run("connection refused", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		check(t, post, nil, "http://"+addr+"/", Retry, "connection_refused")
	})

	t.Run("connection reset", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			conn.(*net.TCPConn).SetLinger(0) // close with RST
			conn.Close()
		}))
		defer srv.Close()
		check(t, post, nil, srv.URL, Retry, "connection_reset")
	})

	t.Run("closed without response", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			conn.Close()
		}))
		defer srv.Close()
		check(t, post, nil, srv.URL, Retry, "eof")
	})

	t.Run("timeout", func(t *testing.T) {
		t.Parallel()
		release := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			<-release
		}))
		defer srv.Close()
		defer close(release)
		c := &http.Client{Timeout: 50 * time.Millisecond}
		check(t, post, c, srv.URL, Retry, "timeout")
	})

	t.Run("tls unknown authority", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
		srv.Config.ErrorLog = discardLog()
		defer srv.Close()
		check(t, post, &http.Client{}, srv.URL, Retry, "tls")
	})

	t.Run("tls to a plain server", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
		defer srv.Close()
		check(t, post, nil, strings.Replace(srv.URL, "http://", "https://", 1), Retry, "tls")
	})

	t.Run("tls to a non-TLS, non-HTTP server", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				conn.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
				conn.Close()
			}
		}()
		check(t, post, nil, "https://"+ln.Addr().String()+"/", Retry, "tls")
	})

	t.Run("dns", func(t *testing.T) {
		t.Parallel()
		// .invalid never resolves (RFC 6761).
		check(t, post, nil, "http://relay-test.invalid/", Retry, "dns")
	})

	t.Run("redirect not followed", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "http://169.254.169.254/", http.StatusFound)
		}))
		defer srv.Close()
		status, h, err := post(t, nil, srv.URL)
		d := Classify(status, h, err)
		want := Decision{Outcome: Retry, Status: 302, Class: "http_3xx",
			Reason: `HTTP 302 Found: redirect to "http://169.254.169.254/" not followed`}
		if d != want {
			t.Errorf("got %+v, want %+v", d, want)
		}
	})
}

func check(t *testing.T, post func(*testing.T, *http.Client, string) (int, http.Header, error),
	c *http.Client, url string, outcome Outcome, class string) {
	t.Helper()
	status, h, err := post(t, c, url)
	if err == nil {
		t.Fatalf("POST %s: status %d, want a transport error", url, status)
	}
	d := Classify(status, h, err)
	if d.Outcome != outcome || d.Class != class {
		t.Errorf("Classify(%v) = %+v, want outcome %v class %q", err, d, outcome, class)
	}
	if !strings.HasPrefix(d.Reason, humanClass(class)+": ") {
		t.Errorf("Reason %q does not name the class %q", d.Reason, class)
	}
}

func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }
