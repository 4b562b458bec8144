package relaytest

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
)

// Scripted is a raw TCP receiver, for answers a net/http server would
// never write (garbage, conflicting lengths, a close mid-answer). For each
// connection, answer is called with the connection's requests one by one,
// after each request's head and body are read, and writes whatever it
// likes; returning false closes the connection.
type Scripted struct {
	ln    net.Listener
	Conns atomic.Int64 // connections accepted
	Reqs  atomic.Int64 // requests read
}

// NewScripted listens on loopback until t ends.
func NewScripted(t testing.TB, answer func(conn net.Conn, n int) bool) *Scripted {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Scripted{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.Conns.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for n := 0; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					s.Reqs.Add(1)
					if !answer(c, n) {
						return
					}
				}
			}()
		}
	}()
	return s
}

// URL is the receiver's address as http://127.0.0.1:port/.
func (s *Scripted) URL() string { return "http://" + s.ln.Addr().String() + "/" }
