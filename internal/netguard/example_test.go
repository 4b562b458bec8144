package netguard_test

import (
	"fmt"
	"net/netip"

	"github.com/outbox-relay/outbox-relay/internal/netguard"
)

func ExampleGuard_Check() {
	g := &netguard.Guard{Allow: []netip.Prefix{netip.MustParsePrefix("10.20.0.0/16")}}
	for _, a := range []string{"1.1.1.1", "10.20.3.4", "10.99.0.1", "::ffff:169.254.169.254"} {
		fmt.Println(a, "->", g.Check(netip.MustParseAddr(a)))
	}
	// Output:
	// 1.1.1.1 -> <nil>
	// 10.20.3.4 -> <nil>
	// 10.99.0.1 -> destination 10.99.0.1 is blocked: private 10.0.0.0/8 (add it to the allowlist to permit)
	// ::ffff:169.254.169.254 -> destination ::ffff:169.254.169.254 is blocked: link-local 169.254.0.0/16 (cloud metadata) (IPv4-mapped ::ffff:0:0/96) (add it to the allowlist to permit)
}
