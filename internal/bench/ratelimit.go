package bench

import (
	"context"
	"fmt"
	"math"
	"time"
)

// The ratelimit phase (issue 4), in a database of its own with one relay:
//
//  1. Endpoint L (tenant rl-l, rate_limit EndpointRate, rate_burst NULL so
//     the bucket holds max(1, ceil(rate)) tokens) gets a backlog of
//     rate × (window + 3 s) + burst events, and endpoint U (tenant rl-u, no
//     limit) a backlog of UnthrottledBacklog; both are COPYed, L's first,
//     before the relay starts. The window is [L's first delivery + 1 s,
//     that + RateDuration): the first second holds the full bucket's burst
//     and is left out. L's deliveries in the window over its length is the
//     rate; U's deliveries in the same window are U's throughput meanwhile.
//  2. Then tenant rl-t (rate_limit TenantRate, rate_burst NULL) with two
//     unlimited endpoints T1 and T2 gets rate × (window + 3 s) + burst
//     events, half each, COPYed with the relay running; the window is
//     chosen the same way from the first delivery to either, and the rate
//     is the sum over both.
//
// Times are the receivers' arrival times. The backlogs outlast the windows
// by about 2 s, which the figures show (deliveries after the window).

// RateWindow is one rate-limited measurement.
type RateWindow struct {
	Limit        float64   `json:"limit_per_s"`
	Burst        int       `json:"burst"`
	Backlog      int       `json:"backlog"`
	WindowSecs   float64   `json:"window_s"`
	SkipSecs     float64   `json:"window_starts_after_first_delivery_s"`
	FirstSecond  int       `json:"delivered_in_first_second"`
	InWindow     int       `json:"delivered_in_window"`
	AfterWindow  int       `json:"delivered_after_window"`
	Rate         float64   `json:"rate_per_s"`
	ErrorPct     float64   `json:"error_pct"`
	MinPerSecond int       `json:"min_per_second"`
	MaxPerSecond int       `json:"max_per_second"`
	PerEndpoint  []float64 `json:"per_endpoint_rate_per_s,omitempty"`
	PerSecond    []int     `json:"per_second"` // deliveries in each second of the window
	Counts
}

// Unthrottled is endpoint U's drain during L's window.
type Unthrottled struct {
	Backlog    int     `json:"backlog"`
	InWindow   int     `json:"delivered_in_window"`
	RatePerSec float64 `json:"rate_in_window_per_s"` // deliveries in the window / the time U was draining within it
	BusySecs   float64 `json:"busy_in_window_s"`
	DrainSecs  float64 `json:"drain_s"` // first to last delivery
	Counts
}

// RateLimit is the ratelimit phase's figures.
type RateLimit struct {
	Endpoint    RateWindow  `json:"endpoint"`
	Unthrottled Unthrottled `json:"unthrottled"`
	Tenant      RateWindow  `json:"tenant"`
	Spilled     float64     `json:"spilled"` // relay metric over the phase; -1 if unread
	Loaded      float64     `json:"loaded"`
	Rows        Rows        `json:"rows"`
	TargetPct   float64     `json:"target_error_pct"`
	Load        Load        `json:"load_avg_1m"`
}

// TargetRateErrorPct: a limited endpoint receives its rate ± 5 % (issue 4).
const TargetRateErrorPct = 5.0

// Clean reports whether every event arrived once, intact, with exactly
// one succeeded row.
func (rl *RateLimit) Clean() bool {
	return rl.Endpoint.Counts.Clean() && rl.Unthrottled.Counts.Clean() && rl.Tenant.Counts.Clean() && rl.Rows.Exact()
}

// Met reports whether both rates are within the target.
func (rl *RateLimit) Met() bool {
	return math.Abs(rl.Endpoint.ErrorPct) <= rl.TargetPct && math.Abs(rl.Tenant.ErrorPct) <= rl.TargetPct
}

// burstOf is the limiter's default bucket for a NULL rate_burst.
func burstOf(rate int) int { return max(1, rate) }

// window measures sorted arrival times (Unix ns): the window starts skip
// after the first arrival and lasts d.
func window(times []int64, skip, d time.Duration) (w RateWindow, start, end int64) {
	w.WindowSecs, w.SkipSecs = d.Seconds(), skip.Seconds()
	if len(times) == 0 {
		return w, 0, 0
	}
	start = times[0] + int64(skip)
	end = start + int64(d)
	bins := make([]int, int(math.Ceil(d.Seconds())))
	for _, t := range times {
		if t < times[0]+int64(time.Second) {
			w.FirstSecond++
		}
		switch {
		case t >= start && t < end:
			w.InWindow++
			bins[min(len(bins)-1, int((t-start)/int64(time.Second)))]++
		case t >= end:
			w.AfterWindow++
		}
	}
	w.PerSecond = bins
	w.Rate = float64(w.InWindow) / d.Seconds()
	w.MinPerSecond, w.MaxPerSecond = math.MaxInt, 0
	// A partial last bin (d not whole seconds) is left out of min/max.
	full := int(d / time.Second)
	for i, n := range bins {
		if i < full {
			w.MinPerSecond, w.MaxPerSecond = min(w.MinPerSecond, n), max(w.MaxPerSecond, n)
		}
	}
	if w.MinPerSecond == math.MaxInt {
		w.MinPerSecond = 0
	}
	return w, start, end
}

func mergeSorted(a, b []int64) []int64 {
	out := make([]int64, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		if j == len(b) || (i < len(a) && a[i] <= b[j]) {
			out = append(out, a[i])
			i++
		} else {
			out = append(out, b[j])
			j++
		}
	}
	return out
}

func countIn(times []int64, start, end int64) int {
	n := 0
	for _, t := range times {
		if t >= start && t < end {
			n++
		}
	}
	return n
}

func (r *run) ratelimit(ctx context.Context) error {
	fc := r.cfg.Faults
	d := fc.RateDuration
	const skip = time.Second
	db, err := r.newPhaseDB(ctx, "ratelimit")
	if err != nil {
		return err
	}
	defer r.dropPhaseDB(db)

	burstL, burstT := burstOf(fc.EndpointRate), burstOf(fc.TenantRate)
	nL := int(float64(fc.EndpointRate)*(d+3*time.Second).Seconds()) + burstL
	nU := fc.UnthrottledBacklog
	nT := int(float64(fc.TenantRate)*(d+3*time.Second).Seconds()) + burstT
	nT1, nT2 := (nT+1)/2, nT/2

	type ep struct {
		id, tenant, extra string
		tag               uint32
		n                 int
		tl                *tally
		rc                *faultReceiver
	}
	eps := []*ep{
		{id: "ep_rl_l", tenant: "rl-l", extra: fmt.Sprintf("rate_limit = %d", fc.EndpointRate), tag: tagRateL, n: nL},
		{id: "ep_rl_u", tenant: "rl-u", tag: tagRateU, n: nU},
		{id: "ep_rl_t1", tenant: "rl-t", tag: tagRateT1, n: nT1},
		{id: "ep_rl_t2", tenant: "rl-t", tag: tagRateT2, n: nT2},
	}
	for _, e := range eps {
		e.tl = newTally(e.tag, e.n, r.cfg.BodyBytes, false, r.verifier())
		if e.rc, err = startFaultReceiver(e.tl, true); err != nil {
			return err
		}
		defer e.rc.close()
		if err := addEndpoint(ctx, db.pool, e.id, e.tenant, e.rc.url, r.secretText, e.extra); err != nil {
			return err
		}
	}
	L, U, T1, T2 := eps[0], eps[1], eps[2], eps[3]
	if _, err := db.pool.Exec(ctx, `INSERT INTO relay.tenants (id, rate_limit) VALUES ('rl-t', $1)`, fc.TenantRate); err != nil {
		return fmt.Errorf("register tenant: %w", err)
	}

	r.progress("ratelimit: inserting %d events for L (rate_limit %d/s, burst %d) and %d for the unthrottled U", nL, fc.EndpointRate, burstL, nU)
	for _, e := range []*ep{L, U} {
		if err := copyEvents(ctx, db.pool, e.tag, 0, e.n, r.cfg.TxnRows, r.cfg.BodyBytes, e.tenant, e.id); err != nil {
			return err
		}
	}
	p, err := r.startPhaseRelay(db)
	if err != nil {
		return err
	}
	defer func() { p.stop(30 * time.Second) }()
	rl := &RateLimit{TargetPct: TargetRateErrorPct, Spilled: -1, Loaded: -1, Load: Load{Start: loadAvg()}}
	r.res.RateLimit = rl
	r.progress("ratelimit: relay started; L's window is %s from its first delivery + %s", d, skip)
	timeout := r.cfg.Timeout + d
	for _, e := range []*ep{L, U} {
		if err := waitDistinct(ctx, e.tl, e.n, timeout, p.exited); err != nil {
			return fmt.Errorf("%s: %w", e.id, err)
		}
	}
	lt := L.rc.arrivals()
	var start, end int64
	rl.Endpoint, start, end = window(lt, skip, d)
	rl.Endpoint.Limit, rl.Endpoint.Burst, rl.Endpoint.Backlog = float64(fc.EndpointRate), burstL, nL
	rl.Endpoint.ErrorPct = (rl.Endpoint.Rate - rl.Endpoint.Limit) / rl.Endpoint.Limit * 100
	rl.Endpoint.count(L.tl)
	ut := U.rc.arrivals()
	u := Unthrottled{Backlog: nU, InWindow: countIn(ut, start, end)}
	if len(ut) > 0 {
		u.DrainSecs = float64(ut[len(ut)-1]-ut[0]) / 1e9
		busyFrom, busyTo := max(start, ut[0]), min(end, ut[len(ut)-1])
		if busyTo > busyFrom {
			u.BusySecs = float64(busyTo-busyFrom) / 1e9
			u.RatePerSec = float64(u.InWindow) / u.BusySecs
		}
	}
	u.count(U.tl)
	rl.Unthrottled = u
	r.progress("ratelimit: L %.1f/s over %s (%+.2f %%); U %d deliveries in the window (%.0f/s over %.1fs busy)",
		rl.Endpoint.Rate, d, rl.Endpoint.ErrorPct, u.InWindow, u.RatePerSec, u.BusySecs)

	r.progress("ratelimit: inserting %d events for tenant rl-t (rate_limit %d/s, burst %d) over two endpoints, relay running", nT, fc.TenantRate, burstT)
	for from := 0; from < nT1; from += r.cfg.TxnRows {
		for _, e := range []*ep{T1, T2} {
			if n := min(r.cfg.TxnRows, e.n-from); n > 0 {
				if err := copyEvents(ctx, db.pool, e.tag, from, n, r.cfg.TxnRows, r.cfg.BodyBytes, e.tenant, e.id); err != nil {
					return err
				}
			}
		}
	}
	for _, e := range []*ep{T1, T2} {
		if err := waitDistinct(ctx, e.tl, e.n, timeout, p.exited); err != nil {
			return fmt.Errorf("%s: %w", e.id, err)
		}
	}
	t1, t2 := T1.rc.arrivals(), T2.rc.arrivals()
	rl.Tenant, start, end = window(mergeSorted(t1, t2), skip, d)
	rl.Tenant.Limit, rl.Tenant.Burst, rl.Tenant.Backlog = float64(fc.TenantRate), burstT, nT
	rl.Tenant.ErrorPct = (rl.Tenant.Rate - rl.Tenant.Limit) / rl.Tenant.Limit * 100
	rl.Tenant.PerEndpoint = []float64{float64(countIn(t1, start, end)) / d.Seconds(), float64(countIn(t2, start, end)) / d.Seconds()}
	var c1, c2 Counts
	c1.count(T1.tl)
	c2.count(T2.tl)
	rl.Tenant.Counts = sumCounts(c1, c2)
	r.progress("ratelimit: tenant %.1f/s over %s (%+.2f %%): %.1f + %.1f", rl.Tenant.Rate, d, rl.Tenant.ErrorPct, rl.Tenant.PerEndpoint[0], rl.Tenant.PerEndpoint[1])

	if err := waitSettled(ctx, db.pool, nL+nU+nT, r.cfg.Timeout, p.exited); err != nil {
		return err
	}
	if m, err := p.scrape(ctx); err == nil {
		rl.Spilled, rl.Loaded = m["outbox_relay_spilled_total"], m["outbox_relay_loaded_total"]
	}
	rl.Rows, err = countRows(ctx, db.pool)
	rl.Load.End = loadAvg()
	return err
}

func sumCounts(a, b Counts) Counts {
	return Counts{Requests: a.Requests + b.Requests, Distinct: a.Distinct + b.Distinct, Duplicates: a.Duplicates + b.Duplicates,
		Missing: a.Missing + b.Missing, Unexpected: a.Unexpected + b.Unexpected, BadBodies: a.BadBodies + b.BadBodies, BadSigs: a.BadSigs + b.BadSigs}
}
