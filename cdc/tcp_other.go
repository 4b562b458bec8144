//go:build !linux

package cdc

import (
	"net"
	"time"
)

// setUserTimeout does nothing off Linux: TCP_USER_TIMEOUT is Linux's.
func setUserTimeout(*net.TCPConn, time.Duration) error { return nil }
