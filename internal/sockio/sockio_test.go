//go:build linux

package sockio

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pair returns a wrapped client end and the server end of a loopback
// TCP connection.
func pair(t *testing.T) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	dial := Dial((&net.Dialer{}).DialContext)
	c, err := dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); srv.Close() })
	w, ok := c.(*Conn)
	if !ok {
		t.Fatalf("Dial gave %T, want *Conn", c)
	}
	return w, srv
}

func TestRoundTripLargerThanTheSocketBuffers(t *testing.T) {
	c, srv := pair(t)
	// 8 MiB: far past the send and receive buffers, so Write meets
	// EAGAIN and waits in the poller while the peer reads slowly.
	want := make([]byte, 8<<20)
	rand.Read(want)
	got := make(chan []byte, 1)
	go func() {
		var buf bytes.Buffer
		chunk := make([]byte, 64<<10)
		for buf.Len() < len(want) {
			time.Sleep(time.Millisecond)
			n, err := srv.Read(chunk)
			buf.Write(chunk[:n])
			if err != nil {
				break
			}
		}
		got <- buf.Bytes()
	}()
	n, err := c.Write(want)
	if err != nil || n != len(want) {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(want))
	}
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("peer read %d bytes, not the %d written (or not the same bytes)", len(b), len(want))
	}

	// And back: the peer writes, Read returns what is there, in pieces.
	go func() { srv.Write(want); srv.Close() }()
	back, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("ReadAll: %v", err)
	}
	if !bytes.Equal(back, want) {
		t.Fatalf("read back %d bytes, want the %d sent", len(back), len(want))
	}
	// The peer has closed: EOF again, not an error.
	if n, err := c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("Read after EOF = %d, %v; want 0, io.EOF", n, err)
	}
}

func TestReadWaitsForDataThatComesLater(t *testing.T) {
	c, srv := pair(t)
	go func() {
		time.Sleep(50 * time.Millisecond)
		srv.Write([]byte("hello"))
	}()
	start := time.Now()
	buf := make([]byte, 100)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("Read = %q, %v; want hello, nil", buf[:n], err)
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Fatalf("Read returned after %v, before the data was sent", d)
	}
	if n, err := c.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty Read = %d, %v; want 0, nil", n, err)
	}
}

func TestDeadlineAndCloseErrors(t *testing.T) {
	c, _ := pair(t)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 10))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v; want a timeout (os.ErrDeadlineExceeded)", err)
	}
	if !strings.HasPrefix(err.Error(), "read tcp ") {
		t.Fatalf("error %q is not worded as net.Conn's (read tcp ...)", err)
	}

	// A Read waiting in the poller is woken by a deadline in the past,
	// which is how pgconn and h1 interrupt a read on cancel.
	c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := c.Read(make([]byte, 10)); done <- err }()
	time.Sleep(20 * time.Millisecond)
	c.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("interrupted Read: %v; want os.ErrDeadlineExceeded", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a deadline in the past did not wake the waiting Read")
	}

	c.Close()
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close: %v; want net.ErrClosed", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after Close: %v; want net.ErrClosed", err)
	}
}

func TestResetIsASyscallError(t *testing.T) {
	c, srv := pair(t)
	// A close with unread data in the peer's receive buffer sends RST.
	c.Write([]byte("unread"))
	time.Sleep(20 * time.Millisecond)
	srv.(*net.TCPConn).SetLinger(0)
	srv.Close()
	time.Sleep(20 * time.Millisecond)
	_, err := c.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("Read after the peer's reset: %v; want ECONNRESET", err)
	}
	var se *os.SyscallError
	if !errors.As(err, &se) || se.Syscall != "read" {
		t.Fatalf("reset error %v does not carry the syscall's name", err)
	}
}

func TestWrapLeavesOtherConnsAlone(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Fatal("Wrap changed a net.Pipe end, which has no socket to read raw")
	}
}

func TestUnixSocket(t *testing.T) {
	path := t.TempDir() + "/s"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		io.Copy(s, s)
	}()
	c, err := Dial((&net.Dialer{}).DialContext)(context.Background(), "unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*Conn); !ok {
		t.Fatalf("a Unix socket was not wrapped: %T", c)
	}
	msg := []byte("SELECT 1")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, %v; want %q", got, err, msg)
	}
}

// TLS over a wrapped connection (how pgconn speaks to a server with
// sslmode=require): the handshake and records run over Read and Write.
func TestTLSOverAWrappedConn(t *testing.T) {
	srv := httptest.NewUnstartedServer(nil) // only for its self-signed certificate
	srv.StartTLS()
	cert := srv.TLS.Certificates[0]
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	srv.Close()

	c, raw := pair(t)
	done := make(chan error, 1)
	go func() {
		s := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{cert}})
		buf := make([]byte, 1<<20)
		n, err := io.ReadFull(s, buf)
		if err == nil {
			_, err = s.Write(buf[:n])
		}
		done <- err
	}()
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "example.com"})
	want := make([]byte, 1<<20)
	rand.Read(want)
	if _, err := tc.Write(want); err != nil {
		t.Fatalf("TLS write: %v", err)
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(tc, got); err != nil {
		t.Fatalf("TLS read: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("server side: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the 1 MiB echoed over TLS came back different")
	}
	if !tc.ConnectionState().HandshakeComplete {
		t.Fatal("no TLS handshake")
	}
}
