package limiter_test

import (
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/limiter"
)

func Example() {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := start

	l := limiter.New()
	// Endpoint ep-1 takes 2 deliveries/s, with room for a burst of 2; its
	// tenant acme takes 10/s over all of its endpoints.
	l.Endpoints().Configure("ep-1", limiter.Limit{Rate: 2, Burst: 2}, now)
	l.Tenants().Configure("acme", limiter.Limit{Rate: 10}, now)

	for range 3 {
		ok, wait := l.Take(now, "ep-1", "acme")
		fmt.Println(ok, wait)
	}
	// The scheduler parks ep-1 for the wait instead of polling.
	now = now.Add(500 * time.Millisecond)
	ok, _ := l.Take(now, "ep-1", "acme")
	fmt.Println("after 500ms:", ok)

	// Raising the limit keeps what was earned (nothing, just now) and gives
	// no extra burst: the next token still has to be earned, at 4/s.
	l.Endpoints().Configure("ep-1", limiter.Limit{Rate: 4, Burst: 4}, now)
	tokens, _ := l.Endpoints().Tokens("ep-1", now)
	_, wait := l.Take(now, "ep-1", "acme")
	fmt.Printf("after raise: %.1f tokens, wait %v\n", tokens, wait)

	// An unlimited limit removes the bucket.
	l.Endpoints().Configure("ep-1", limiter.Limit{}, now)
	fmt.Println("limited endpoints:", l.Endpoints().Len())
	// Output:
	// true 0s
	// true 0s
	// false 500ms
	// after 500ms: true
	// after raise: 0.0 tokens, wait 250ms
	// limited endpoints: 0
}
