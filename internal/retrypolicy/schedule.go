package retrypolicy

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// DefaultSchedule is the delay before each attempt: entry i is the delay
// before attempt i+1, measured from the end of attempt i. The first attempt
// is immediate, so the default is 8 attempts spread over about 28 hours.
var DefaultSchedule = []time.Duration{
	0,
	5 * time.Second,
	5 * time.Minute,
	30 * time.Minute,
	2 * time.Hour,
	5 * time.Hour,
	10 * time.Hour,
	10 * time.Hour,
}

// DefaultMaxDelay caps any single delay computed by Next, including one a
// receiver asks for with Retry-After, when the caller passes no cap.
const DefaultMaxDelay = 24 * time.Hour

// Delay returns the delay before attempt number attempt+1, given that
// attempt attempts have been made so far, under a budget of attempts in
// all: schedule[attempt], or the schedule's last delay repeated when the
// budget is longer than the schedule (budget 0 means len(schedule)). It
// reports false when the budget is spent (attempt >= budget), the
// schedule is empty, or attempt is negative. It allocates nothing,
// however large the budget.
func Delay(schedule []time.Duration, budget, attempt int) (time.Duration, bool) {
	if budget <= 0 {
		budget = len(schedule)
	}
	if len(schedule) == 0 || attempt < 0 || attempt >= budget {
		return 0, false
	}
	return schedule[min(attempt, len(schedule)-1)], true
}

// Exponential builds a schedule of the given number of attempts: the first
// is immediate, then base, 2*base, 4*base, ... each capped at max. A max of
// zero or less means no cap (delays saturate at the largest Duration rather
// than overflow); a base of zero or less gives an all-zero schedule. It
// returns nil when attempts <= 0.
func Exponential(base, max time.Duration, attempts int) []time.Duration {
	if attempts <= 0 {
		return nil
	}
	if max <= 0 {
		max = time.Duration(math.MaxInt64)
	}
	s := make([]time.Duration, attempts)
	if base <= 0 {
		return s
	}
	d := min(base, max)
	for i := 1; i < attempts; i++ {
		s[i] = d
		if d > max/2 {
			d = max
		} else {
			d *= 2
		}
	}
	return s
}

// Jitter spreads d by up to frac of itself in either direction, using rnd,
// a number in [0, 1) drawn by the caller: rnd = 0 gives d*(1-frac), rnd
// close to 1 gives (after rounding to the nanosecond) d*(1+frac), and 0.5
// gives d. frac is clamped to [0, 1] and rnd to [0, 1]; NaN counts as 0.
// The result is never negative and saturates at the largest Duration.
func Jitter(d time.Duration, frac float64, rnd float64) time.Duration {
	if d <= 0 {
		return 0
	}
	frac = clamp01(frac)
	rnd = clamp01(rnd)
	offset := float64(d) * frac * (2*rnd - 1)
	r := math.Round(float64(d) + offset)
	if r >= math.MaxInt64 {
		return time.Duration(math.MaxInt64)
	}
	if r <= 0 {
		return 0
	}
	return time.Duration(r)
}

func clamp01(f float64) float64 {
	switch {
	case math.IsNaN(f), f < 0:
		return 0
	case f > 1:
		return 1
	}
	return f
}

// RetryAfter parses the Retry-After header (RFC 9110 section 10.2.3) as
// either delta-seconds or an HTTP date, relative to now. It reports false
// when the header is absent, malformed (signs, fractions, garbage), too
// large to represent, or a date that is already past.
func RetryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	v := strings.TrimSpace(h.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if isDigits(v) {
		secs, err := strconv.ParseInt(v, 10, 64)
		if err != nil || secs > int64(math.MaxInt64/time.Second) {
			return 0, false
		}
		return time.Duration(secs) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	d := t.Sub(now)
	if d < 0 {
		return 0, false
	}
	return d, true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// Next returns the delay before the next attempt after an attempt that was
// classified as d, when attempt attempts have been made so far (including
// that one). It reports false when there is to be no next attempt: the
// outcome is not Retry, or the schedule is exhausted.
//
// The delay is the schedule's, raised to the receiver's Retry-After (read
// from h relative to now) when the status was 429 or 503, and then limited
// to maxDelay: min(max(schedule, Retry-After), maxDelay). A Retry-After never
// shortens the schedule's delay, and never buys attempts beyond its end.
// A maxDelay of zero or less means DefaultMaxDelay.
func Next(schedule []time.Duration, attempt int, d Decision, h http.Header, now time.Time, maxDelay time.Duration) (time.Duration, bool) {
	if d.Outcome != Retry {
		return 0, false
	}
	delay, ok := Delay(schedule, 0, attempt)
	if !ok {
		return 0, false
	}
	if d.Status == http.StatusTooManyRequests || d.Status == http.StatusServiceUnavailable {
		if ra, ok := RetryAfter(h, now); ok && ra > delay {
			delay = ra
		}
	}
	if maxDelay <= 0 {
		maxDelay = DefaultMaxDelay
	}
	return min(delay, maxDelay), true
}
