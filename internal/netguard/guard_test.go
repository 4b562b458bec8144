package netguard

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	t.Parallel()
	allow := func(prefixes ...string) []netip.Prefix {
		var ps []netip.Prefix
		for _, p := range prefixes {
			ps = append(ps, netip.MustParsePrefix(p))
		}
		return ps
	}
	tests := []struct {
		addr  string
		allow []netip.Prefix
		rule  string // "" means allowed
	}{
		// Public addresses pass.
		{"1.1.1.1", nil, ""},
		{"8.8.8.8", nil, ""},
		{"93.184.215.14", nil, ""},
		{"100.63.255.255", nil, ""}, // just below CGNAT
		{"100.128.0.0", nil, ""},    // just above CGNAT
		{"172.15.255.255", nil, ""}, // just below 172.16/12
		{"172.32.0.0", nil, ""},     // just above 172.16/12
		{"192.0.1.1", nil, ""},
		{"198.17.255.255", nil, ""}, // just below benchmarking
		{"198.20.0.0", nil, ""},     // just above benchmarking
		{"223.255.255.255", nil, ""},
		{"2606:4700::1111", nil, ""},
		{"2001:4860:4860::8888", nil, ""},
		{"2a00:1450:4001:80b::200e", nil, ""},
		{"::ffff:1.1.1.1", nil, ""},

		// IPv4 rules.
		{"0.0.0.0", nil, "unspecified 0.0.0.0"},
		{"0.1.2.3", nil, "this network 0.0.0.0/8"},
		{"10.0.0.1", nil, "private 10.0.0.0/8"},
		{"10.255.255.255", nil, "private 10.0.0.0/8"},
		{"100.64.0.1", nil, "CGNAT 100.64.0.0/10"},
		{"100.127.255.255", nil, "CGNAT 100.64.0.0/10"},
		{"127.0.0.1", nil, "loopback 127.0.0.0/8"},
		{"127.255.255.254", nil, "loopback 127.0.0.0/8"},
		{"169.254.169.254", nil, "link-local 169.254.0.0/16 (cloud metadata)"},
		{"169.254.0.1", nil, "link-local 169.254.0.0/16 (cloud metadata)"},
		{"172.16.0.1", nil, "private 172.16.0.0/12"},
		{"172.31.255.255", nil, "private 172.16.0.0/12"},
		{"192.0.0.8", nil, "IETF protocol assignments 192.0.0.0/24"},
		{"192.0.2.10", nil, "documentation 192.0.2.0/24 (TEST-NET-1)"},
		{"192.88.99.1", nil, "6to4 relay anycast 192.88.99.0/24"},
		{"192.168.1.1", nil, "private 192.168.0.0/16"},
		{"198.18.0.1", nil, "benchmarking 198.18.0.0/15"},
		{"198.19.255.255", nil, "benchmarking 198.18.0.0/15"},
		{"198.51.100.7", nil, "documentation 198.51.100.0/24 (TEST-NET-2)"},
		{"203.0.113.7", nil, "documentation 203.0.113.0/24 (TEST-NET-3)"},
		{"224.0.0.1", nil, "multicast 224.0.0.0/4"},
		{"239.255.255.250", nil, "multicast 224.0.0.0/4"},
		{"240.0.0.1", nil, "reserved 240.0.0.0/4"},
		{"255.255.255.254", nil, "reserved 240.0.0.0/4"},
		{"255.255.255.255", nil, "broadcast 255.255.255.255"},

		// IPv4-mapped IPv6 is judged as IPv4.
		{"::ffff:127.0.0.1", nil, "loopback 127.0.0.0/8 (IPv4-mapped ::ffff:0:0/96)"},
		{"::ffff:169.254.169.254", nil, "link-local 169.254.0.0/16 (cloud metadata) (IPv4-mapped ::ffff:0:0/96)"},
		{"::ffff:10.1.2.3", nil, "private 10.0.0.0/8 (IPv4-mapped ::ffff:0:0/96)"},
		{"::ffff:0.0.0.0", nil, "unspecified 0.0.0.0 (IPv4-mapped ::ffff:0:0/96)"},

		// IPv6 rules.
		{"::", nil, "IPv6 unspecified ::"},
		{"::1", nil, "IPv6 loopback ::1"},
		{"::ffff:0:7f00:1", nil, "IPv4-translated ::ffff:0:0:0/96"},
		{"::127.0.0.1", nil, "IPv4-compatible ::/96 (deprecated)"},
		{"64:ff9b::7f00:1", nil, "NAT64 64:ff9b::/96"},
		{"64:ff9b::a9fe:a9fe", nil, "NAT64 64:ff9b::/96"},
		{"64:ff9b:1::1", nil, "local-use NAT64 64:ff9b:1::/48"},
		{"100::1", nil, "IPv6 discard-only 100::/64"},
		{"2001:0:4136:e378:8000:63bf:3fff:fdd2", nil, "Teredo 2001::/32"},
		{"2001:2::1", nil, "IPv6 benchmarking 2001:2::/48"},
		{"2001:20::1", nil, "ORCHIDv2 2001:20::/28"},
		{"2001:db8::1", nil, "IPv6 documentation 2001:db8::/32"},
		{"2002:7f00:1::1", nil, "6to4 2002::/16"},
		{"3fff::1", nil, "IPv6 documentation 3fff::/20"},
		{"fc00::1", nil, "IPv6 unique-local fc00::/7"},
		{"fd12:3456:789a::1", nil, "IPv6 unique-local fc00::/7"},
		{"fe80::1", nil, "IPv6 link-local fe80::/10"},
		{"fe80::1%eth0", nil, "IPv6 link-local fe80::/10"},
		{"febf::1", nil, "IPv6 link-local fe80::/10"},
		{"fec0::1", nil, "IPv6 site-local fec0::/10 (deprecated)"},
		{"ff02::1", nil, "IPv6 multicast ff00::/8"},
		{"ff05::1:3", nil, "IPv6 multicast ff00::/8"},
		{"1::1", nil, "IPv6 outside global unicast 2000::/3"},
		{"4000::1", nil, "IPv6 outside global unicast 2000::/3"},
		{"::2", nil, "IPv4-compatible ::/96 (deprecated)"},

		// Allowlist holes, checked first.
		{"127.0.0.1", allow("127.0.0.0/8"), ""},
		{"::ffff:127.0.0.1", allow("127.0.0.0/8"), ""},
		{"::ffff:127.0.0.1", allow("::ffff:127.0.0.0/104"), ""},
		{"10.1.2.3", allow("10.1.2.0/24"), ""},
		{"10.1.3.1", allow("10.1.2.0/24"), "private 10.0.0.0/8"},
		{"169.254.169.254", allow("10.0.0.0/8", "192.168.0.0/16"), "link-local 169.254.0.0/16 (cloud metadata)"},
		{"fd00::5", allow("fd00::/64"), ""},
		{"fe80::1%eth0", allow("fe80::/10"), ""},
		{"::1", allow("127.0.0.0/8"), "IPv6 loopback ::1"},
		{"127.0.0.1", allow("::1/128"), "loopback 127.0.0.0/8"},
		{"1.1.1.1", allow("10.0.0.0/8"), ""},
	}
	seen := map[string]bool{}
	for _, tt := range tests {
		addr := netip.MustParseAddr(tt.addr)
		g := &Guard{Allow: tt.allow}
		err := g.Check(addr)
		if tt.rule == "" {
			if err != nil {
				t.Errorf("Check(%s) allow=%v: %v, want allowed", tt.addr, tt.allow, err)
			}
			continue
		}
		var be *BlockedError
		if !errors.As(err, &be) {
			t.Errorf("Check(%s) allow=%v = %v, want *BlockedError %q", tt.addr, tt.allow, err, tt.rule)
			continue
		}
		if be.Rule != tt.rule || be.Addr != addr {
			t.Errorf("Check(%s) allow=%v = {%s, %q}, want {%s, %q}", tt.addr, tt.allow, be.Addr, be.Rule, addr, tt.rule)
		}
		seen[strings.TrimSuffix(be.Rule, " (IPv4-mapped ::ffff:0:0/96)")] = true
	}
	// Every rule must be exercised by at least one case above.
	all := []rule{globalUnicast6}
	all = append(all, v4Rules...)
	all = append(all, v6Rules...)
	for _, rl := range all {
		if !seen[rl.name] {
			t.Errorf("rule %q (%s) has no test case", rl.name, rl.prefix)
		}
	}
}

func TestCheckInvalidAndNil(t *testing.T) {
	t.Parallel()
	var be *BlockedError
	if err := (&Guard{}).Check(netip.Addr{}); !errors.As(err, &be) || be.Rule != "invalid address" {
		t.Errorf("Check(zero Addr) = %v, want blocked invalid address", err)
	}
	var g *Guard // a nil guard still guards
	if err := g.Check(netip.MustParseAddr("127.0.0.1")); err == nil {
		t.Errorf("nil Guard allowed 127.0.0.1")
	}
	if err := g.Check(netip.MustParseAddr("1.1.1.1")); err != nil {
		t.Errorf("nil Guard blocked 1.1.1.1: %v", err)
	}
}

func TestBlockedError(t *testing.T) {
	t.Parallel()
	err := (&Guard{}).Check(netip.MustParseAddr("127.0.0.1"))
	want := "destination 127.0.0.1 is blocked: loopback 127.0.0.0/8 (add it to the allowlist to permit)"
	if err == nil || err.Error() != want {
		t.Fatalf("Error() = %v, want %q", err, want)
	}
	var r interface{ Retryable() bool }
	if !errors.As(err, &r) || r.Retryable() {
		t.Errorf("BlockedError must report Retryable() == false")
	}
}

func TestControl(t *testing.T) {
	t.Parallel()
	g := &Guard{}
	tests := []struct {
		network, address string
		blocked          string // rule, or "" for allowed
		otherErr         bool
	}{
		{"tcp", "1.1.1.1:443", "", false},
		{"tcp4", "1.1.1.1:443", "", false},
		{"tcp6", "[2606:4700::1111]:443", "", false},
		{"udp", "8.8.8.8:53", "", false},
		{"tcp", "127.0.0.1:5432", "loopback 127.0.0.0/8", false},
		{"tcp6", "[::ffff:169.254.169.254]:80", "link-local 169.254.0.0/16 (cloud metadata) (IPv4-mapped ::ffff:0:0/96)", false},
		{"tcp6", "[fe80::1%eth0]:80", "IPv6 link-local fe80::/10", false},
		{"tcp", "localhost:80", "", true}, // Control only ever sees resolved IPs
		{"tcp", "1.1.1.1", "", true},
		{"unix", "/var/run/postgresql/.s.PGSQL.5432", "", true},
	}
	for _, tt := range tests {
		err := g.Control(tt.network, tt.address, nil)
		var be *BlockedError
		switch {
		case tt.otherErr:
			if err == nil || errors.As(err, &be) {
				t.Errorf("Control(%s, %s) = %v, want a non-BlockedError refusal", tt.network, tt.address, err)
			}
		case tt.blocked == "":
			if err != nil {
				t.Errorf("Control(%s, %s) = %v, want nil", tt.network, tt.address, err)
			}
		default:
			if !errors.As(err, &be) || be.Rule != tt.blocked {
				t.Errorf("Control(%s, %s) = %v, want blocked by %q", tt.network, tt.address, err, tt.blocked)
			}
		}
	}
}
