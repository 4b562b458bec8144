//go:build !linux

package cdc

import (
	"net"
	"testing"
)

func clientSockopts(t *testing.T, _ net.Conn) map[string]int {
	t.Skip("socket options are read on Linux only")
	return nil
}
