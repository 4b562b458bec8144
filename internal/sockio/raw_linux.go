//go:build linux

package sockio

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// maxRW caps one read(2) or write(2), as internal/poll does.
const maxRW = 1 << 30

// Conn is a net.Conn whose Read and Write are raw syscalls. Concurrent
// Reads (or Writes) are serialised, as on a net.Conn.
type Conn struct {
	net.Conn
	rc syscall.RawConn

	rmu   sync.Mutex
	rbuf  []byte
	rn    int
	rerr  syscall.Errno
	readF func(uintptr) bool

	wmu    sync.Mutex
	wbuf   []byte
	wn     int
	werr   syscall.Errno
	writeF func(uintptr) bool
}

// Wrap returns c with raw-syscall Read and Write when c is a socket the
// runtime polls (a *net.TCPConn or *net.UnixConn), else c itself.
func Wrap(c net.Conn) net.Conn {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return c
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return c
	}
	w := &Conn{Conn: c, rc: rc}
	w.readF = w.read
	w.writeF = w.write
	return w
}

// Read reads up to len(p) bytes, waiting in the poller while none are
// there. It returns io.EOF when the peer has closed its side.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) > maxRW {
		p = p[:maxRW]
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerr = p, 0, 0
	err := c.rc.Read(c.readF) // before c.rerr is read: argument order is not specified
	err = c.failure("read", err, c.rerr)
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, err
	case c.rn == 0:
		return 0, io.EOF
	}
	return c.rn, nil
}

// read is the RawConn callback: false asks the poller to wait.
func (c *Conn) read(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case 0:
			c.rn = int(r)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			c.rerr = e
			return true
		}
	}
}

// Write writes all of p, waiting in the poller while the socket's send
// buffer is full, or returns how much it wrote and why it stopped.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.wn, c.werr = p, 0, 0
	err := c.rc.Write(c.writeF)
	err = c.failure("write", err, c.werr)
	c.wbuf = nil
	return c.wn, err
}

// write is the RawConn callback: it writes until all of wbuf is out
// (true), the kernel says EAGAIN (false: wait until writable) or fails.
func (c *Conn) write(fd uintptr) bool {
	for c.wn < len(c.wbuf) {
		chunk := c.wbuf[c.wn:]
		if len(chunk) > maxRW {
			chunk = chunk[:maxRW]
		}
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&chunk[0])), uintptr(len(chunk)))
		switch e {
		case 0:
			c.wn += int(r)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.werr = e
			return true
		}
	}
	return true
}

// failure is the error of a Read or Write: the RawConn's own (a
// deadline, a closed connection), else the syscall's errno, else nil.
func (c *Conn) failure(op string, err error, errno syscall.Errno) error {
	switch {
	case err != nil:
		return c.opError(op, err)
	case errno != 0:
		return c.opError(op, os.NewSyscallError(op, errno))
	}
	return nil
}

// opError words an error as net.Conn's Read and Write do ("read tcp
// a->b: ..."): the RawConn's own errors (a deadline, a closed
// connection) come as "raw-read" / "raw-write".
func (c *Conn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		cp := *oe
		cp.Op = op
		return &cp
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
