package cdc

import (
	"net"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// clientSockopts reads the keepalive and user-timeout options of c's
// socket (on Linux; TCP_USER_TIMEOUT in milliseconds).
func clientSockopts(t *testing.T, c net.Conn) map[string]int {
	t.Helper()
	sc, ok := c.(syscall.Conn)
	if !ok {
		t.Fatalf("%T has no socket", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	opts := []struct {
		name       string
		level, opt int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT},
		{"TCP_USER_TIMEOUT", unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT},
	}
	if err := rc.Control(func(fd uintptr) {
		for _, o := range opts {
			v, err := unix.GetsockoptInt(int(fd), o.level, o.opt)
			if err != nil {
				t.Errorf("getsockopt %s: %v", o.name, err)
			}
			out[o.name] = v
		}
	}); err != nil {
		t.Fatal(err)
	}
	return out
}
