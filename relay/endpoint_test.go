package relay

import (
	"testing"
	"time"
)

// An endpoint's retry_schedule and max_attempts, as parsed from its row,
// decide each retry's delay; a max_attempts of millions (keep retrying
// through a long outage) is a budget, not a schedule built to its length
// on every failure.
func TestRetryDelayFollowsTheEndpointRow(t *testing.T) { // not parallel: AllocsPerRun
	text := func(v string) *string { return &v }
	def := []time.Duration{0, 5 * time.Second, 5 * time.Minute}
	cases := []struct {
		name     string
		row      mapRow
		attempts int
		want     time.Duration
		ok       bool
	}{
		{"default schedule", mapRow{}, 1, 5 * time.Second, true},
		{"default spent", mapRow{}, 3, 0, false},
		{"own schedule", mapRow{"retry_schedule": text("{0s,1s,1m}")}, 2, time.Minute, true},
		{"cut by max_attempts", mapRow{"retry_schedule": text("{0s,1s,1m}"), "max_attempts": text("2")}, 2, 0, false},
		{"extended: last delay again", mapRow{"retry_schedule": text("{0s,1s,1m}"), "max_attempts": text("5")}, 4, time.Minute, true},
		{"extended, spent", mapRow{"retry_schedule": text("{0s,1s,1m}"), "max_attempts": text("5")}, 5, 0, false},
		{"a million", mapRow{"max_attempts": text("1000000")}, 999_999, 5 * time.Minute, true},
		{"int4's largest", mapRow{"max_attempts": text("2147483647")}, 2_000_000_000, 5 * time.Minute, true},
	}
	for _, c := range cases {
		c.row["id"], c.row["url"], c.row["secrets"] = text("ep"), text("http://receiver.test/hook"), text("{whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}")
		ep, err := parseEndpoint(c.row)
		if err != nil || ep.Invalid != "" {
			t.Fatalf("%s: parseEndpoint: %v %q", c.name, err, ep.Invalid)
		}
		if got, ok := ep.retryDelay(def, c.attempts); got != c.want || ok != c.ok {
			t.Errorf("%s: retryDelay(%d) = %v, %v; want %v, %v", c.name, c.attempts, got, ok, c.want, c.ok)
		}
		if n := testing.AllocsPerRun(20, func() { ep.retryDelay(def, c.attempts) }); n != 0 {
			t.Errorf("%s: %.0f allocations per retryDelay, want 0", c.name, n)
		}
	}
}
