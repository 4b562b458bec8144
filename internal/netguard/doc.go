// Package netguard keeps the delivery client from being turned against the
// network it runs in (server-side request forgery).
//
// Webhook URLs are written by tenants. Without a guard, a URL such as
// http://169.254.169.254/latest/meta-data/ or http://localhost:5432/ would
// make the relay probe the cloud metadata service, the database next to it,
// or anything else on the private network, and report the result back in a
// delivery status.
//
// A [Guard] refuses to connect to any address in a special-purpose range:
// loopback, private (RFC 1918), CGNAT, link-local (cloud metadata), multicast,
// broadcast, reserved, documentation, benchmarking, "this network", IPv6
// unique-local and link-local, and the IPv6 ranges that embed or tunnel an
// IPv4 address (NAT64, 6to4, Teredo), plus all IPv6 space outside global
// unicast 2000::/3. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are unmapped
// and judged as the IPv4 address they are. [Guard.Allow] opens holes, and is
// checked first: an operator who runs receivers on the private network
// allowlists exactly those prefixes.
//
// The check runs in [Guard.Control], the net.Dialer hook that sees the
// resolved IP of every connection attempt just before connect(2). Checking
// there, rather than resolving the host name up front, means a host name
// that resolves to a public address when validated and to 127.0.0.1 when
// dialed (DNS rebinding) is still refused, and every address tried by Happy
// Eyeballs is checked.
//
// A refusal is a [*BlockedError]. It reports Retryable() == false, so the
// retry policy makes the delivery fail at once with a reason naming the
// range, instead of retrying a request that can never be allowed.
//
// What the guard does not do: it does not restrict ports or schemes, and it
// cannot see past an HTTP proxy — with a proxy, the address checked is the
// proxy's. Use [Guard.Transport], which disables proxies, or set
// Transport.Proxy to nil yourself. Redirects are a separate concern: the
// relay does not follow them at all (see internal/retrypolicy); if a client
// did, each redirect's connection would still pass through the guard.
package netguard
