package h1

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/relaytest"
	"github.com/outbox-relay/outbox-relay/internal/retrypolicy"
)

// Post puts exactly the prepared head, the extra fields, Content-Length
// and the body on the wire, and two posts share one connection.
func TestPostWire(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 2)
	accepted := make(chan struct{}, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					var head strings.Builder
					for {
						line, err := br.ReadString('\n')
						if err != nil {
							return
						}
						head.WriteString(line)
						if line == "\r\n" {
							break
						}
					}
					body := make([]byte, 7)
					if _, err := io.ReadFull(br, body); err != nil {
						return
					}
					got <- head.String() + string(body)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
		}
	}()
	u, _ := url.Parse("http://user:pw@" + ln.Addr().String() + "/hooks/in?x=1")
	p, err := Prepare(u, http.Header{"X-Static": {"s"}})
	if err != nil {
		t.Fatal(err)
	}
	tr := newTransport()
	defer tr.CloseIdleConnections()
	for i := range 2 {
		// A framing field among the extra ones is the transport's: left out.
		resp, err := tr.Post(context.Background(), time.Now().Add(5*time.Second), p,
			[]Field{{"Webhook-Id", "msg_1"}, {"Content-Length", "999"}, {"Traceparent", "00-ab-cd-01"}}, []byte(`{"a":1}`))
		if err != nil {
			t.Fatalf("post %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "ok" || resp.Request != nil {
			t.Fatalf("post %d: %d %q", i, resp.StatusCode, b)
		}
		want := "POST /hooks/in?x=1 HTTP/1.1\r\nHost: " + ln.Addr().String() + "\r\nX-Static: s\r\nAuthorization: Basic dXNlcjpwdw==\r\n" +
			"Webhook-Id: msg_1\r\nTraceparent: 00-ab-cd-01\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
		if w := <-got; w != want {
			t.Fatalf("post %d: on the wire\n%q\nwant\n%q", i, w, want)
		}
	}
	if n := len(accepted); n != 1 {
		t.Errorf("%d connections for two posts, want 1", n)
	}
}

// Fields and heads that could split a request are refused before
// anything is sent.
func TestPostRefusesBadFields(t *testing.T) {
	srv := relaytest.NewScripted(t, func(c net.Conn, n int) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
		return true
	})
	u, _ := url.Parse(srv.URL())
	if _, err := Prepare(u, http.Header{"X-Bad": {"a\r\nInjected: yes"}}); err == nil {
		t.Error("a header value with CRLF was prepared")
	}
	if _, err := Prepare(&url.URL{Scheme: "https", Host: "example.com"}, nil); err == nil {
		t.Error("an https URL was prepared")
	}
	p, err := Prepare(u, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := newTransport()
	defer tr.CloseIdleConnections()
	for _, f := range []Field{{"Bad Name", "v"}, {"X-Ok", "v\nInjected: yes"}} {
		if _, err := tr.Post(context.Background(), time.Time{}, p, []Field{f}, nil); err == nil {
			t.Errorf("field %q: %q was sent", f.Name, f.Value)
		}
	}
	if n := srv.Conns.Load(); n != 0 {
		t.Errorf("%d connections made for refused requests", n)
	}
}

// A receiver that hangs past the deadline gets one request, and the error
// is a timeout worded as a context deadline.
func TestPostDeadline(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	srv := relaytest.NewScripted(t, func(c net.Conn, n int) bool { <-release; return false })
	tr := newTransport()
	defer tr.CloseIdleConnections()
	p := postTimesOut(t, tr, srv.URL(), 150*time.Millisecond)
	time.Sleep(50 * time.Millisecond)
	if n := srv.Reqs.Load(); n != 1 {
		t.Errorf("server read %d requests, want 1", n)
	}
	// Ending the context interrupts a wait with no deadline.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if _, err := tr.Post(ctx, time.Time{}, p, nil, []byte(`{}`)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled post: %v, want context.Canceled", err)
	}
}

// Post's deadline bounds the dial of a new connection too, not only the
// exchange on it.
func TestPostDeadlineBoundsTheDial(t *testing.T) {
	tr := &Transport{Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		<-ctx.Done() // a dial that never completes on its own
		return nil, ctx.Err()
	}}
	postTimesOut(t, tr, "http://192.0.2.1/", 100*time.Millisecond)
}

// postTimesOut posts to rawURL through tr with a deadline of d from now
// and checks that the post ends soon after it with a timeout worded as
// a context deadline. It returns the prepared head.
func postTimesOut(t *testing.T, tr *Transport, rawURL string, d time.Duration) *Prepared {
	t.Helper()
	u, _ := url.Parse(rawURL)
	p, err := Prepare(u, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = tr.Post(context.Background(), time.Now().Add(d), p, nil, []byte(`{}`))
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %s to time out at %s", took, d)
	}
	if !errors.Is(err, context.DeadlineExceeded) || retrypolicy.ErrorClass(err) != "timeout" {
		t.Errorf("error %v (class %q), want a deadline exceeded timeout", err, retrypolicy.ErrorClass(err))
	}
	return p
}
