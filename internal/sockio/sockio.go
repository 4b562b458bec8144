// Package sockio reads and writes sockets without the Go runtime's
// blocking-syscall bookkeeping.
//
// A read or write on a net.Conn goes through entersyscall and
// exitsyscall, because a syscall might block. On a socket it never does:
// Go opens every socket non-blocking and parks the goroutine in the
// network poller when the kernel says EAGAIN. The bookkeeping still
// costs at a live rate, where each event is a few small reads and writes
// with the process idle in between: a syscall entered while every P is
// idle wakes the runtime's monitor thread (sysmon), which then sleeps
// and wakes in 20 µs steps until it finds the process idle again, and a
// write that spans a monitor tick has its P handed to another thread.
// In a profile of the relay at 1,000 events a second that was about a
// fifth of its CPU.
//
// Wrap returns a connection whose Read and Write make the same read(2)
// and write(2) calls as raw syscalls inside syscall.RawConn's callbacks,
// so the poller, deadlines and Close work as before. Everything else
// (addresses, deadlines, Close) is the wrapped connection's. That is on
// Linux; elsewhere (where Go reaches the kernel through libc) Wrap
// returns the connection as it is.
package sockio

import (
	"context"
	"net"
)

// Dial returns a dial function whose connections dial makes and Wrap
// wraps (for pgconn.Config.DialFunc, h1.Transport.Dial).
func Dial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return Wrap(c), nil
	}
}
