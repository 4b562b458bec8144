package main

import (
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/bench"
)

// benchFaultFlags registers the flags of the bench's fault phases
// (recovery, takeover, ratelimit, memory), all opt-in through --phases.
func benchFaultFlags(fs *flag.FlagSet, c *bench.FaultConfig) {
	fs.IntVar(&c.Rate, "fault-rate", 500, "recovery and takeover phases: the steady producer's events per second during the kills")
	fs.IntVar(&c.Kills, "kills", 5, "recovery phase: how many times the relay is killed with SIGKILL and a new one started at once")
	fs.IntVar(&c.Takeovers, "takeovers", 3, "takeover phase: how many times the active relay is killed with SIGKILL while a standby waits (a fresh standby is started after each)")
	fs.DurationVar(&c.KillEvery, "kill-every", 3*time.Second, "recovery and takeover phases: how long the relay delivers after a restart or takeover before the next kill, plus a random 0-1s")
	fs.DurationVar(&c.RestartTimeout, "restart-timeout", time.Minute, "recovery and takeover phases: fail if no delivery arrives this long after a kill")
	fs.DurationVar(&c.RateDuration, "ratelimit-duration", 30*time.Second, "ratelimit phase: the measuring window, which starts 1s after the limited endpoint's (or tenant's) first delivery")
	fs.IntVar(&c.EndpointRate, "endpoint-rate", 200, "ratelimit phase: rate_limit of the limited endpoint, deliveries/s (rate_burst NULL: a bucket of the same number)")
	fs.IntVar(&c.TenantRate, "tenant-rate", 300, "ratelimit phase: rate_limit of the tenant over its two endpoints, deliveries/s (rate_burst NULL likewise)")
	fs.IntVar(&c.UnthrottledBacklog, "unthrottled-backlog", 0, "ratelimit phase: backlog of the unthrottled endpoint draining alongside (0: 16,000 per second of --ratelimit-duration + 1s)")
	fs.IntVar(&c.MemoryEvents, "memory-events", 1_000_000, "memory phase: events inserted per overflow policy while the receiver is down (see --memory-down; its waits are bounded by the larger of --timeout and 1ms per event)")
	fs.Var(policyList{&c.MemoryPolicies}, "memory-policies", "memory phase: comma-separated --overflow policies to run, in order (default spill,block)")
	fs.StringVar(&c.MemoryDown, "memory-down", bench.MemoryDownRefuse, "memory phase: how the receiver is down: refuse (nothing listens on its port; every connection is refused) or 503 (it accepts connections and answers 503)")
	fs.DurationVar(&c.MemorySettle, "memory-settle", 5*time.Second, "memory phase: how long the receiver stays down after the relay has settled (spill: every event read and acknowledged; block: nothing read for 1s after the inserts); spilled/loaded over it are reported")
}

// policyList is a comma-separated list of overflow policies.
type policyList struct{ p *[]string }

func (l policyList) String() string {
	if l.p == nil {
		return ""
	}
	return strings.Join(*l.p, ",")
}

func (l policyList) Set(s string) error {
	var out []string
	for _, v := range strings.Split(s, ",") {
		v = strings.TrimSpace(v)
		if v != "spill" && v != "block" {
			return fmt.Errorf("%q is not spill or block", v)
		}
		out = append(out, v)
	}
	*l.p = out
	return nil
}
