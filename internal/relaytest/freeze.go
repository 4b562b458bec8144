package relaytest

import (
	"net"
	"net/url"
	"sync"
	"testing"
)

// FreezeProxy forwards TCP connections to a target. Freeze makes every
// connection open at that moment go silent in both directions without
// closing it, as a partition or a vanished host does: what each side
// writes is read by the proxy's kernel and goes no further. Connections
// opened after Freeze work normally.
type FreezeProxy struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	conns  map[*proxied]struct{}
	closed bool
	wg     sync.WaitGroup
}

type proxied struct {
	client, server net.Conn
	frozen         chan struct{} // closed by Freeze
	once           sync.Once
}

// NewFreezeProxy listens on loopback and forwards to target (host:port).
// The proxy and its connections close at the end of the test.
func NewFreezeProxy(t testing.TB, target string) *FreezeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &FreezeProxy{ln: ln, target: target, conns: map[*proxied]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's host:port.
func (p *FreezeProxy) Addr() string { return p.ln.Addr().String() }

// URL returns connString (a postgres:// URL) pointed at the proxy.
func (p *FreezeProxy) URL(t testing.TB, connString string) string {
	t.Helper()
	u, err := url.Parse(connString)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = p.Addr()
	return u.String()
}

// Freeze silences every connection open now; it returns how many.
func (p *FreezeProxy) Freeze() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.once.Do(func() { close(c.frozen) })
	}
	return len(p.conns)
}

func (p *FreezeProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		c := &proxied{client: client, server: server, frozen: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			client.Close()
			server.Close()
			return
		}
		p.conns[c] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(c, client, server)
		go p.pipe(c, server, client)
	}
}

// pipe copies from src to dst until either ends or the connection is
// frozen; a frozen pipe keeps both sockets open and reads nothing more.
func (p *FreezeProxy) pipe(c *proxied, src, dst net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-c.frozen:
			return
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
			}
		}
		if err != nil {
			// One side ended: end the other, as a plain forwarder would.
			c.client.Close()
			c.server.Close()
			return
		}
	}
}

func (p *FreezeProxy) close() {
	p.mu.Lock()
	p.closed = true
	conns := p.conns
	p.conns = map[*proxied]struct{}{}
	p.mu.Unlock()
	p.ln.Close()
	for c := range conns {
		c.client.Close()
		c.server.Close()
	}
	p.wg.Wait()
}

// SilentServer listens on loopback and accepts every connection without
// ever reading from it or answering, as a stopped postmaster or a proxy
// that lost its backend does: the kernel completes the handshake and
// acknowledges what the client sends, and nothing comes back. It returns
// the host:port; the listener and its connections close at the end of
// the test (after its parallel subtests).
func SilentServer(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn // the accept loop's own until done is closed
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range held {
			c.Close()
		}
	})
	return ln.Addr().String()
}
