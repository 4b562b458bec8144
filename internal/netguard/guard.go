package netguard

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"time"
)

// BlockedError is returned when a connection to Addr is refused.
type BlockedError struct {
	// Addr is the address that was to be dialed, as dialed (an
	// IPv4-mapped address stays mapped here).
	Addr netip.Addr
	// Rule names the blocked range, for example "loopback 127.0.0.0/8".
	Rule string
}

func (e *BlockedError) Error() string {
	return fmt.Sprintf("destination %s is blocked: %s (add it to the allowlist to permit)", e.Addr, e.Rule)
}

// Retryable reports false: the same address will be blocked next time too.
func (e *BlockedError) Retryable() bool { return false }

// ErrorClass names the error for metrics labels (see internal/retrypolicy).
func (e *BlockedError) ErrorClass() string { return "blocked" }

type rule struct {
	prefix netip.Prefix
	name   string
}

func r(prefix, name string) rule {
	return rule{netip.MustParsePrefix(prefix), name}
}

// Rules are checked in order; more specific prefixes come before the wider
// ones that contain them, so the reason names the most precise range.
var v4Rules = []rule{
	r("0.0.0.0/32", "unspecified 0.0.0.0"),
	r("0.0.0.0/8", "this network 0.0.0.0/8"),
	r("10.0.0.0/8", "private 10.0.0.0/8"),
	r("100.64.0.0/10", "CGNAT 100.64.0.0/10"),
	r("127.0.0.0/8", "loopback 127.0.0.0/8"),
	r("169.254.0.0/16", "link-local 169.254.0.0/16 (cloud metadata)"),
	r("172.16.0.0/12", "private 172.16.0.0/12"),
	r("192.0.0.0/24", "IETF protocol assignments 192.0.0.0/24"),
	r("192.0.2.0/24", "documentation 192.0.2.0/24 (TEST-NET-1)"),
	r("192.88.99.0/24", "6to4 relay anycast 192.88.99.0/24"),
	r("192.168.0.0/16", "private 192.168.0.0/16"),
	r("198.18.0.0/15", "benchmarking 198.18.0.0/15"),
	r("198.51.100.0/24", "documentation 198.51.100.0/24 (TEST-NET-2)"),
	r("203.0.113.0/24", "documentation 203.0.113.0/24 (TEST-NET-3)"),
	r("224.0.0.0/4", "multicast 224.0.0.0/4"),
	r("255.255.255.255/32", "broadcast 255.255.255.255"),
	r("240.0.0.0/4", "reserved 240.0.0.0/4"),
}

var v6Rules = []rule{
	r("::/128", "IPv6 unspecified ::"),
	r("::1/128", "IPv6 loopback ::1"),
	// ::ffff:0:0/96 never gets here: mapped addresses are unmapped first.
	r("::ffff:0:0:0/96", "IPv4-translated ::ffff:0:0:0/96"),
	r("::/96", "IPv4-compatible ::/96 (deprecated)"),
	r("64:ff9b::/96", "NAT64 64:ff9b::/96"),
	r("64:ff9b:1::/48", "local-use NAT64 64:ff9b:1::/48"),
	r("100::/64", "IPv6 discard-only 100::/64"),
	r("2001::/32", "Teredo 2001::/32"),
	r("2001:2::/48", "IPv6 benchmarking 2001:2::/48"),
	r("2001:20::/28", "ORCHIDv2 2001:20::/28"),
	r("2001:db8::/32", "IPv6 documentation 2001:db8::/32"),
	r("2002::/16", "6to4 2002::/16"),
	r("3fff::/20", "IPv6 documentation 3fff::/20"),
	r("fc00::/7", "IPv6 unique-local fc00::/7"),
	r("fe80::/10", "IPv6 link-local fe80::/10"),
	r("fec0::/10", "IPv6 site-local fec0::/10 (deprecated)"),
	r("ff00::/8", "IPv6 multicast ff00::/8"),
}

// Everything routable on the IPv6 internet is in 2000::/3; the rest is
// unassigned or special, so it is refused wholesale after the named rules.
var globalUnicast6 = r("2000::/3", "IPv6 outside global unicast 2000::/3")

// Guard decides which destination addresses the relay may connect to. The
// zero value blocks every special-purpose range and allows nothing extra. A
// Guard must not be modified while in use; it is safe for concurrent use
// otherwise.
type Guard struct {
	// Allow lists prefixes that are permitted even though a rule would
	// block them, such as a private subnet where receivers run. Checked
	// before the rules. An IPv4 prefix also permits the IPv4-mapped form of
	// its addresses. Default: empty.
	Allow []netip.Prefix
}

// Check returns nil if addr may be dialed, and a *BlockedError if not. An
// IPv6 zone is ignored for the check.
func (g *Guard) Check(addr netip.Addr) error {
	if !addr.IsValid() {
		return &BlockedError{Addr: addr, Rule: "invalid address"}
	}
	bare := addr.WithZone("")
	unmapped := bare.Unmap()
	if g != nil {
		for _, p := range g.Allow {
			if p.Contains(bare) || p.Contains(unmapped) {
				return nil
			}
		}
	}
	if unmapped.Is4() {
		for _, rl := range v4Rules {
			if rl.prefix.Contains(unmapped) {
				name := rl.name
				if bare.Is4In6() {
					name += " (IPv4-mapped ::ffff:0:0/96)"
				}
				return &BlockedError{Addr: addr, Rule: name}
			}
		}
		return nil
	}
	for _, rl := range v6Rules {
		if rl.prefix.Contains(bare) {
			return &BlockedError{Addr: addr, Rule: rl.name}
		}
	}
	if !globalUnicast6.prefix.Contains(bare) {
		return &BlockedError{Addr: addr, Rule: globalUnicast6.name}
	}
	return nil
}

// Control checks the resolved address of a connection attempt. It has the
// signature of net.Dialer.Control and runs after name resolution, once per
// address tried, before the connection is made. address must be an IP and
// port ("203.0.113.7:443", "[2606:4700::1111]:443"); anything else, and any
// network other than tcp and udp, is refused.
func (g *Guard) Control(network, address string, _ syscall.RawConn) error {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
	default:
		return fmt.Errorf("netguard: network %q is not allowed", network)
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("netguard: cannot check dial address %q: %w", address, err)
	}
	return g.Check(ap.Addr())
}

// NewDialer returns a net.Dialer that refuses blocked destinations, with the
// given connect timeout (zero means none, as in net.Dialer).
func (g *Guard) NewDialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{
		Timeout:   timeout,
		KeepAlive: 30 * time.Second,
		Control:   g.Control,
	}
}

// DialContext dials like net.Dialer.DialContext with no timeout other than
// ctx, refusing blocked destinations. It fits http.Transport.DialContext.
func (g *Guard) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return g.NewDialer(0).DialContext(ctx, network, address)
}

// Transport returns a clone of http.DefaultTransport that dials through
// the guard with the given connect timeout and uses no proxy (a proxy would
// make the guard check the proxy's address instead of the receiver's).
func (g *Guard) Transport(dialTimeout time.Duration) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = g.NewDialer(dialTimeout).DialContext
	return t
}
