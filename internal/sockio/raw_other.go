//go:build !linux

package sockio

import "net"

// Wrap returns c: raw syscalls are used on Linux only.
func Wrap(c net.Conn) net.Conn { return c }
