package limiter_test

import (
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/limiter"
)

// t0 is the fake clock's origin; tests advance it by adding durations.
var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// drain takes as fast as allowed from start until end (inclusive), jumping
// the clock by the returned wait after each refusal, and returns the number
// of grants.
func drain(t *testing.T, take func(time.Time) (bool, time.Duration), start, end time.Time) int {
	t.Helper()
	n := 0
	for now := start; !now.After(end); {
		ok, wait := take(now)
		if ok {
			if wait != 0 {
				t.Fatalf("granted with wait %v", wait)
			}
			n++
			continue
		}
		if wait <= 0 {
			t.Fatalf("refused with wait %v at %v", wait, now.Sub(start))
		}
		now = now.Add(wait)
	}
	return n
}

func tokens(t *testing.T, s *limiter.Set, key string, now time.Time) float64 {
	t.Helper()
	n, ok := s.Tokens(key, now)
	if !ok {
		t.Fatalf("Tokens(%q): no bucket", key)
	}
	return n
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestLimitDefaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in        limiter.Limit
		unlimited bool
		want      limiter.Limit // as reported by Set.Limit
	}{
		{limiter.Limit{}, true, limiter.Limit{}},
		{limiter.Limit{Rate: -1, Burst: 5}, true, limiter.Limit{}},
		{limiter.Limit{Rate: math.NaN()}, true, limiter.Limit{}},
		{limiter.Limit{Rate: math.Inf(1)}, true, limiter.Limit{}},
		{limiter.Limit{Rate: 1e9}, true, limiter.Limit{}},
		{limiter.Limit{Rate: 0.5}, false, limiter.Limit{Rate: 0.5, Burst: 1}},
		{limiter.Limit{Rate: 2.5}, false, limiter.Limit{Rate: 2.5, Burst: 3}},
		{limiter.Limit{Rate: 200}, false, limiter.Limit{Rate: 200, Burst: 200}},
		{limiter.Limit{Rate: 200, Burst: -3}, false, limiter.Limit{Rate: 200, Burst: 200}},
		{limiter.Limit{Rate: 200, Burst: 7}, false, limiter.Limit{Rate: 200, Burst: 7}},
	}
	for _, tt := range tests {
		if got := tt.in.Unlimited(); got != tt.unlimited {
			t.Errorf("%+v.Unlimited() = %v, want %v", tt.in, got, tt.unlimited)
		}
		s := limiter.NewSet()
		s.Configure("k", tt.in, t0)
		got, ok := s.Limit("k")
		if ok == tt.unlimited || got != tt.want {
			t.Errorf("Configure(%+v): Limit() = %+v, %v; want %+v, %v", tt.in, got, ok, tt.want, !tt.unlimited)
		}
		if !tt.unlimited && !near(tokens(t, s, "k", t0), float64(tt.want.Burst)) {
			t.Errorf("Configure(%+v): new bucket not full", tt.in)
		}
	}
}

func TestWaitsDoNotDrift(t *testing.T) {
	t.Parallel()
	// Float rounding must not creep into the waits: at 200/s every wait
	// over 30 s is exactly 5ms; at 3/s they are 1/3 s rounded up, with the
	// remainder carried when the bucket has room for it (burst 2), and
	// dropped when the bucket is full at that instant (burst 1).
	for _, tt := range []struct {
		rate  float64
		burst int
		waits []time.Duration
	}{
		{200, 1, []time.Duration{5 * time.Millisecond}},
		{200, 2, []time.Duration{5 * time.Millisecond}},
		{3, 1, []time.Duration{333333334}},
		{3, 2, []time.Duration{333333334, 333333333, 333333333}},
	} {
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: tt.rate, Burst: tt.burst}, t0)
		for range tt.burst - 1 {
			s.Take(t0, "k")
		}
		now, i := t0, 0
		for now.Before(t0.Add(30 * time.Second)) {
			if ok, _ := s.Take(now, "k"); !ok {
				t.Fatalf("rate %v: refused at +%v", tt.rate, now.Sub(t0))
			}
			ok, wait := s.Take(now, "k")
			if want := tt.waits[i%len(tt.waits)]; ok || wait != want {
				t.Fatalf("rate %v: refusal %d at +%v: Take = %v, %v; want refused, %v", tt.rate, i, now.Sub(t0), ok, wait, want)
			}
			now = now.Add(wait)
			i++
		}
	}
}

func TestSteadyRate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		rate  float64
		burst int
	}{
		{200, 0}, {200, 1}, {200, 50}, {3, 0}, {0.5, 2}, {15000, 100},
	}
	for _, tt := range tests {
		l := limiter.New()
		l.Endpoints().Configure("ep", limiter.Limit{Rate: tt.rate, Burst: tt.burst}, t0)
		lim, _ := l.Endpoints().Limit("ep")
		got := drain(t, func(now time.Time) (bool, time.Duration) {
			return l.Take(now, "ep", "tenant")
		}, t0, t0.Add(30*time.Second))
		want := tt.rate*30 + float64(lim.Burst)
		if math.Abs(float64(got)-want) > 1 {
			t.Errorf("rate %v burst %d: %d grants in 30s, want %v ± 1", tt.rate, lim.Burst, got, want)
		}
	}
}

func TestTenantCapsSumOfEndpoints(t *testing.T) {
	t.Parallel()
	l := limiter.New()
	eps := []string{"a", "b", "c"}
	for _, ep := range eps {
		l.Endpoints().Configure(ep, limiter.Limit{Rate: 200, Burst: 20}, t0)
	}
	l.Tenants().Configure("acme", limiter.Limit{Rate: 300, Burst: 30}, t0)

	// Round-robin over the endpoints, each parked until its own wait is over,
	// the way the scheduler would.
	end := t0.Add(30 * time.Second)
	next := make([]time.Time, len(eps))
	got := make([]int, len(eps))
	for i := range next {
		next[i] = t0
	}
	for turn := 0; ; turn++ {
		// Earliest endpoint first; ties go round-robin.
		i := turn % len(eps)
		for j := range next {
			if next[j].Before(next[i]) {
				i = j
			}
		}
		now := next[i]
		if now.After(end) {
			break
		}
		if ok, wait := l.Take(now, eps[i], "acme"); ok {
			got[i]++
		} else {
			next[i] = now.Add(wait)
		}
	}
	sum := 0
	for i, n := range got {
		sum += n
		if n > 200*30+20 {
			t.Errorf("endpoint %s: %d grants, over its own bound", eps[i], n)
		}
		if n < 2000 {
			t.Errorf("endpoint %s: %d grants, starved", eps[i], n)
		}
	}
	if want := 300*30 + 30; sum < want-1 || sum > want {
		t.Errorf("tenant: %d grants in 30s, want %d (-1)", sum, want)
	}

	// Another tenant is not held back by acme's empty bucket.
	l.Endpoints().Configure("d", limiter.Limit{Rate: 10}, end)
	if ok, _ := l.Take(end, "d", "other"); !ok {
		t.Error("other tenant refused")
	}
}

func TestRefusedTakeConsumesNothing(t *testing.T) {
	t.Parallel()
	l := limiter.New()
	l.Endpoints().Configure("ep", limiter.Limit{Rate: 10, Burst: 5}, t0)
	l.Tenants().Configure("tn", limiter.Limit{Rate: 1, Burst: 1}, t0)

	// The tenant has one token: the first take succeeds, the next is refused
	// by the tenant and must leave the endpoint's 4 tokens alone.
	if ok, _ := l.Take(t0, "ep", "tn"); !ok {
		t.Fatal("first take refused")
	}
	for range 10 {
		if ok, wait := l.Take(t0, "ep", "tn"); ok || wait != time.Second {
			t.Fatalf("Take = %v, %v; want refused, 1s", ok, wait)
		}
	}
	if n := tokens(t, l.Endpoints(), "ep", t0); !near(n, 4) {
		t.Errorf("endpoint tokens after tenant refusals = %v, want 4", n)
	}

	// Now the other way round: the endpoint is empty, the tenant is not.
	l.Tenants().Configure("tn2", limiter.Limit{Rate: 1000, Burst: 1000}, t0)
	for range 4 {
		if ok, _ := l.Take(t0, "ep", "tn2"); !ok {
			t.Fatal("take refused while both have tokens")
		}
	}
	before := tokens(t, l.Tenants(), "tn2", t0)
	for range 10 {
		if ok, wait := l.Take(t0, "ep", "tn2"); ok || wait != 100*time.Millisecond {
			t.Fatalf("Take = %v, %v; want refused, 100ms", ok, wait)
		}
	}
	if after := tokens(t, l.Tenants(), "tn2", t0); after != before {
		t.Errorf("tenant tokens %v -> %v across endpoint refusals", before, after)
	}
}

func TestWaitIsExact(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		ep, tn   limiter.Limit
		wantWait time.Duration
	}{
		{"endpoint only", limiter.Limit{Rate: 200, Burst: 1}, limiter.Limit{}, 5 * time.Millisecond},
		{"tenant only", limiter.Limit{}, limiter.Limit{Rate: 3, Burst: 1}, 333333334}, // 1/3 s rounded up,
		{"tenant slower", limiter.Limit{Rate: 200, Burst: 1}, limiter.Limit{Rate: 4, Burst: 1}, 250 * time.Millisecond},
		{"endpoint slower", limiter.Limit{Rate: 0.5, Burst: 1}, limiter.Limit{Rate: 100, Burst: 1}, 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := limiter.New()
			l.Endpoints().Configure("ep", tt.ep, t0)
			l.Tenants().Configure("tn", tt.tn, t0)
			if ok, _ := l.Take(t0, "ep", "tn"); !ok {
				t.Fatal("first take refused")
			}
			// Partway through the wait, the remaining wait shrinks by exactly
			// the time that passed.
			now := t0
			for _, step := range []time.Duration{0, time.Nanosecond, tt.wantWait / 3} {
				now = now.Add(step)
				ok, wait := l.Take(now, "ep", "tn")
				if ok || wait != tt.wantWait-now.Sub(t0) {
					t.Fatalf("at +%v: Take = %v, %v; want refused, %v", now.Sub(t0), ok, wait, tt.wantWait-now.Sub(t0))
				}
			}
			if ok, wait := l.Take(t0.Add(tt.wantWait-1), "ep", "tn"); ok || wait != 1 {
				t.Fatalf("1ns early: Take = %v, %v; want refused, 1ns", ok, wait)
			}
			if ok, _ := l.Take(t0.Add(tt.wantWait), "ep", "tn"); !ok {
				t.Fatal("refused after the wait")
			}
		})
	}
}

func TestReconfigure(t *testing.T) {
	t.Parallel()
	at := func(d time.Duration) time.Time { return t0.Add(d) }

	t.Run("raise keeps earned tokens and gives no extra", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 10, Burst: 10}, at(0))
		if n := drain(t, func(now time.Time) (bool, time.Duration) { return s.Take(now, "k") }, at(0), at(0)); n != 10 {
			t.Fatalf("drained %d, want 10", n)
		}
		s.Configure("k", limiter.Limit{Rate: 100, Burst: 100}, at(500*time.Millisecond))
		if n := tokens(t, s, "k", at(500*time.Millisecond)); !near(n, 5) {
			t.Errorf("tokens right after raise = %v, want 5", n)
		}
		if n := tokens(t, s, "k", at(600*time.Millisecond)); !near(n, 15) {
			t.Errorf("tokens 100ms after raise = %v, want 15", n)
		}
		if n := tokens(t, s, "k", at(time.Hour)); !near(n, 100) {
			t.Errorf("tokens long after raise = %v, want new burst 100", n)
		}
	})

	t.Run("raise keeps a fractional token", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 1, Burst: 1}, at(0))
		s.Take(at(0), "k")
		s.Configure("k", limiter.Limit{Rate: 2, Burst: 1}, at(500*time.Millisecond))
		if ok, wait := s.Take(at(500*time.Millisecond), "k"); ok || wait != 250*time.Millisecond {
			t.Errorf("Take = %v, %v; want refused, 250ms (half a token kept, at 2/s)", ok, wait)
		}
	})

	t.Run("lower caps tokens to the new burst at once", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 100, Burst: 100}, at(0))
		s.Configure("k", limiter.Limit{Rate: 10, Burst: 5}, at(time.Second))
		if n := tokens(t, s, "k", at(time.Second)); !near(n, 5) {
			t.Errorf("tokens after lower = %v, want 5", n)
		}
		got := drain(t, func(now time.Time) (bool, time.Duration) { return s.Take(now, "k") }, at(time.Second), at(11*time.Second))
		if got != 5+10*10 {
			t.Errorf("%d grants in 10s after lowering, want 105", got)
		}
	})

	t.Run("lower keeps a deficit", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 10, Burst: 1}, at(0))
		s.Take(at(0), "k") // empty; next token at 100ms
		s.Configure("k", limiter.Limit{Rate: 1, Burst: 1}, at(50*time.Millisecond))
		// Half a token was earned; at 1/s the other half takes 500ms.
		if ok, wait := s.Take(at(50*time.Millisecond), "k"); ok || wait != 500*time.Millisecond {
			t.Errorf("Take = %v, %v; want refused, 500ms", ok, wait)
		}
	})

	t.Run("same limit changes nothing", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 3}, at(0))
		s.Take(at(0), "k")
		before := tokens(t, s, "k", at(time.Second))
		s.Configure("k", limiter.Limit{Rate: 3, Burst: 3}, at(time.Second))
		if after := tokens(t, s, "k", at(time.Second)); after != before {
			t.Errorf("tokens %v -> %v", before, after)
		}
	})

	t.Run("to unlimited removes the bucket", func(t *testing.T) {
		t.Parallel()
		l := limiter.New()
		l.Endpoints().Configure("k", limiter.Limit{Rate: 1, Burst: 1}, at(0))
		l.Take(at(0), "k", "")
		if ok, _ := l.Take(at(0), "k", ""); ok {
			t.Fatal("limited bucket granted twice")
		}
		l.Endpoints().Configure("k", limiter.Limit{}, at(0))
		if n := l.Endpoints().Len(); n != 0 {
			t.Errorf("Len = %d after unlimited, want 0", n)
		}
		if _, ok := l.Endpoints().Limit("k"); ok {
			t.Error("Limit reports a bucket after unlimited")
		}
		for range 1000 {
			if ok, _ := l.Take(at(0), "k", ""); !ok {
				t.Fatal("unlimited key refused")
			}
		}
	})

	t.Run("from unlimited starts full", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("k", limiter.Limit{Rate: 5, Burst: 2}, at(time.Minute))
		if n := s.Len(); n != 1 {
			t.Errorf("Len = %d, want 1", n)
		}
		got := drain(t, func(now time.Time) (bool, time.Duration) { return s.Take(now, "k") }, at(time.Minute), at(time.Minute+time.Second))
		if got != 2+5 {
			t.Errorf("%d grants in the first second, want 7", got)
		}
	})

	t.Run("remove", func(t *testing.T) {
		t.Parallel()
		s := limiter.NewSet()
		s.Configure("a", limiter.Limit{Rate: 1}, at(0))
		s.Configure("b", limiter.Limit{Rate: 1}, at(0))
		s.Remove("a")
		s.Remove("nope")
		if n := s.Len(); n != 1 {
			t.Errorf("Len = %d, want 1", n)
		}
		if _, ok := s.Tokens("a", at(0)); ok {
			t.Error("removed key still has tokens")
		}
	})
}

func TestStaleClockIsRefusedNotCredited(t *testing.T) {
	t.Parallel()
	s := limiter.NewSet()
	s.Configure("k", limiter.Limit{Rate: 10, Burst: 1}, t0)
	if ok, _ := s.Take(t0.Add(time.Second), "k"); !ok {
		t.Fatal("take refused")
	}
	// A caller whose now is 50ms behind must wait 150ms, not take.
	if ok, wait := s.Take(t0.Add(950*time.Millisecond), "k"); ok || wait != 150*time.Millisecond {
		t.Errorf("stale Take = %v, %v; want refused, 150ms", ok, wait)
	}
	if n := tokens(t, s, "k", t0.Add(950*time.Millisecond)); n != 0 {
		t.Errorf("stale Tokens = %v, want 0", n)
	}
}

func TestExtremeLimits(t *testing.T) {
	t.Parallel()
	s := limiter.NewSet()
	s.Configure("slow", limiter.Limit{Rate: 1e-300}, t0)
	s.Configure("big", limiter.Limit{Rate: 1, Burst: math.MaxInt}, t0)
	s.Configure("fast", limiter.Limit{Rate: 9e8, Burst: 1}, t0)
	for _, k := range []string{"slow", "big", "fast"} {
		if ok, _ := s.Take(t0, k); !ok {
			t.Errorf("%s: first take refused", k)
		}
	}
	if ok, wait := s.Take(t0, "slow"); ok || wait <= 0 {
		t.Errorf("slow: Take = %v, %v; want refused with a positive wait", ok, wait)
	}
	if ok, wait := s.Take(t0, "fast"); ok || wait != 2 {
		t.Errorf("fast: Take = %v, %v; want refused, 2ns (1.11ns rounded up)", ok, wait)
	}
	s.Configure("slow", limiter.Limit{Rate: 1e300}, t0) // unlimited
	s.Configure("big", limiter.Limit{Rate: 1e-300, Burst: math.MaxInt}, t0)
	s.Configure("fast", limiter.Limit{Rate: 1e-300}, t0)
	if ok, _ := s.Take(t0, "slow"); !ok {
		t.Error("slow: refused after becoming unlimited")
	}
}

// TestConcurrentTakeNeverOverGrants hammers one tenant's endpoints from many
// goroutines sharing an advancing fake clock, whose readings reach Take out
// of order, with reconfiguration of an unrelated key running alongside, and
// counts grants against the token-bucket bound.
func TestConcurrentTakeNeverOverGrants(t *testing.T) {
	t.Parallel()
	const (
		goroutines = 16
		perG       = 5000
		epRate     = 2000.0
		epBurst    = 40
		tnRate     = 3000.0
		tnBurst    = 60
	)
	l := limiter.New()
	eps := []string{"a", "b", "c", "d"}
	for _, ep := range eps {
		l.Endpoints().Configure(ep, limiter.Limit{Rate: epRate, Burst: epBurst}, t0)
	}
	l.Tenants().Configure("acme", limiter.Limit{Rate: tnRate, Burst: tnBurst}, t0)

	var clock atomic.Int64 // ns since t0
	grants := make([]atomic.Int64, len(eps))
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range perG {
				now := t0.Add(time.Duration(clock.Add(10_000))) // 10µs per call
				ep := (g + i) % len(eps)
				if ok, _ := l.Take(now, eps[ep], "acme"); ok {
					grants[ep].Add(1)
				}
			}
		})
	}
	wg.Go(func() {
		for i := range perG {
			now := t0.Add(time.Duration(clock.Load()))
			l.Endpoints().Configure("other", limiter.Limit{Rate: float64(1 + i%7)}, now)
			l.Tenants().Configure("other", limiter.Limit{Rate: float64(1 + i%5)}, now)
			l.Take(now, "other", "other")
			l.Endpoints().Tokens("a", now)
			if i%100 == 0 {
				l.Endpoints().Remove("other")
			}
		}
	})
	wg.Wait()

	elapsed := time.Duration(clock.Load()).Seconds()
	sum := int64(0)
	for i := range grants {
		n := grants[i].Load()
		sum += n
		if bound := epBurst + int64(epRate*elapsed); n > bound {
			t.Errorf("endpoint %s: %d grants over %.3fs, bound %d", eps[i], n, elapsed, bound)
		}
	}
	bound := tnBurst + int64(tnRate*elapsed)
	if sum > bound {
		t.Errorf("tenant: %d grants over %.3fs, bound %d", sum, elapsed, bound)
	}
	// The tenant is the bottleneck and callers outnumber its tokens, so it
	// should be nearly saturated; stale readings cost a little.
	if float64(sum) < 0.9*float64(bound) {
		t.Errorf("tenant: %d grants over %.3fs, far under bound %d", sum, elapsed, bound)
	}
	t.Logf("%d grants over %.3fs simulated, tenant bound %d", sum, elapsed, bound)
}
