package retrypolicy

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"testing"
	"time"
)

func TestDefaultSchedule(t *testing.T) {
	t.Parallel()
	want := []time.Duration{0, 5 * time.Second, 5 * time.Minute, 30 * time.Minute, 2 * time.Hour, 5 * time.Hour, 10 * time.Hour, 10 * time.Hour}
	if !slices.Equal(DefaultSchedule, want) {
		t.Fatalf("DefaultSchedule = %v, want %v", DefaultSchedule, want)
	}
}

func TestDelay(t *testing.T) {
	t.Parallel()
	tests := []struct {
		attempt int
		want    time.Duration
		ok      bool
	}{
		{-1, 0, false},
		{0, 0, true}, // first attempt is immediate
		{1, 5 * time.Second, true},
		{2, 5 * time.Minute, true},
		{3, 30 * time.Minute, true},
		{4, 2 * time.Hour, true},
		{5, 5 * time.Hour, true},
		{6, 10 * time.Hour, true},
		{7, 10 * time.Hour, true},
		{8, 0, false}, // 8 attempts made: exhausted
		{100, 0, false},
	}
	for _, tt := range tests {
		got, ok := Delay(DefaultSchedule, 0, tt.attempt)
		if got != tt.want || ok != tt.ok {
			t.Errorf("Delay(default, 0, %d) = %v, %v; want %v, %v", tt.attempt, got, ok, tt.want, tt.ok)
		}
	}
	if _, ok := Delay(nil, 0, 0); ok {
		t.Errorf("Delay(nil, 0, 0) ok, want exhausted")
	}
	if _, ok := Delay(nil, 5, 0); ok {
		t.Errorf("Delay(nil, 5, 0) ok, want exhausted: no delay to repeat")
	}
}

// A budget cuts the schedule or extends it by repeating its last delay.
func TestDelayBudget(t *testing.T) { // not parallel: AllocsPerRun
	s := []time.Duration{0, time.Second, time.Minute}
	tests := []struct {
		budget, attempt int
		want            time.Duration
		ok              bool
	}{
		{2, 0, 0, true},
		{2, 1, time.Second, true},
		{2, 2, 0, false}, // cut: the minute is never waited
		{3, 2, time.Minute, true},
		{3, 3, 0, false},
		{5, 3, time.Minute, true}, // extended: the last delay again
		{5, 4, time.Minute, true},
		{5, 5, 0, false},
		{1_000_000, 999_999, time.Minute, true},
		{1_000_000, 1_000_000, 0, false},
		{1_000_000, -1, 0, false},
	}
	for _, tt := range tests {
		got, ok := Delay(s, tt.budget, tt.attempt)
		if got != tt.want || ok != tt.ok {
			t.Errorf("Delay(%v, %d, %d) = %v, %v; want %v, %v", s, tt.budget, tt.attempt, got, ok, tt.want, tt.ok)
		}
	}
	// A budget of millions is a number, not a schedule built to its length.
	if n := testing.AllocsPerRun(100, func() { Delay(s, math.MaxInt32, 12345) }); n != 0 {
		t.Errorf("Delay with a budget of %d: %.0f allocations per call, want 0", math.MaxInt32, n)
	}
}

func TestExponential(t *testing.T) {
	t.Parallel()
	s, m, h := time.Second, time.Minute, time.Hour
	tests := []struct {
		base, max time.Duration
		attempts  int
		want      []time.Duration
	}{
		{s, h, 0, nil},
		{s, h, -3, nil},
		{s, h, 1, []time.Duration{0}},
		{s, h, 2, []time.Duration{0, s}},
		{s, h, 6, []time.Duration{0, s, 2 * s, 4 * s, 8 * s, 16 * s}},
		{10 * s, m, 6, []time.Duration{0, 10 * s, 20 * s, 40 * s, m, m}},
		{m, 30 * s, 3, []time.Duration{0, 30 * s, 30 * s}}, // base above max
		{0, h, 3, []time.Duration{0, 0, 0}},
		{-s, h, 3, []time.Duration{0, 0, 0}},
		{h, 0, 4, []time.Duration{0, h, 2 * h, 4 * h}}, // no cap
	}
	for _, tt := range tests {
		got := Exponential(tt.base, tt.max, tt.attempts)
		if !slices.Equal(got, tt.want) {
			t.Errorf("Exponential(%v, %v, %d) = %v, want %v", tt.base, tt.max, tt.attempts, got, tt.want)
		}
	}
	// Uncapped growth saturates instead of overflowing.
	got := Exponential(time.Hour, 0, 80)
	for i := 2; i < len(got); i++ {
		if got[i] < got[i-1] {
			t.Fatalf("Exponential uncapped decreases at %d: %v < %v", i, got[i], got[i-1])
		}
	}
	if last := got[len(got)-1]; last != time.Duration(math.MaxInt64) {
		t.Errorf("last uncapped delay = %v, want saturation at MaxInt64", last)
	}
}

func TestJitterExact(t *testing.T) {
	t.Parallel()
	almostOne := math.Nextafter(1, 0)
	tests := []struct {
		d    time.Duration
		frac float64
		rnd  float64
		want time.Duration
	}{
		{10 * time.Second, 0.1, 0, 9 * time.Second},
		{10 * time.Second, 0.1, almostOne, 11 * time.Second},
		{10 * time.Second, 0.1, 0.5, 10 * time.Second},
		{10 * time.Second, 0.1, 0.75, 10500 * time.Millisecond},
		{10 * time.Hour, 0.25, 0, 7*time.Hour + 30*time.Minute},
		{10 * time.Hour, 0.25, almostOne, 12*time.Hour + 30*time.Minute},
		{5 * time.Minute, 0, 0, 5 * time.Minute},
		{5 * time.Minute, 0, almostOne, 5 * time.Minute},
		{5 * time.Minute, 1, 0, 0},
		{5 * time.Minute, 1, almostOne, 10 * time.Minute},
		{5 * time.Minute, 2, 0, 0},                    // frac clamped to 1: never negative
		{5 * time.Minute, -1, 0, 5 * time.Minute},     // frac clamped to 0
		{5 * time.Minute, 0.1, -5, 270 * time.Second}, // rnd clamped to 0
		{5 * time.Minute, 0.1, 7, 330 * time.Second},  // rnd clamped to 1
		{5 * time.Minute, math.NaN(), 0, 5 * time.Minute},
		{5 * time.Minute, 0.1, math.NaN(), 270 * time.Second},
		{0, 0.5, 0.9, 0},
		{-time.Second, 0.5, 0.9, 0},
		{time.Duration(math.MaxInt64), 0.5, almostOne, time.Duration(math.MaxInt64)},
	}
	for _, tt := range tests {
		if got := Jitter(tt.d, tt.frac, tt.rnd); got != tt.want {
			t.Errorf("Jitter(%v, %v, %v) = %v, want %v", tt.d, tt.frac, tt.rnd, got, tt.want)
		}
	}
}

func TestJitterBounds(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2)) // fixed seed: failures reproduce
	for i := range 100_000 {
		d := time.Duration(r.Int64N(int64(48 * time.Hour)))
		frac := r.Float64()
		rnd := r.Float64()
		got := Jitter(d, frac, rnd)
		lo := time.Duration(math.Floor(float64(d) * (1 - frac)))
		hi := time.Duration(math.Ceil(float64(d) * (1 + frac)))
		if got < lo || got > hi || got < 0 {
			t.Fatalf("case %d: Jitter(%v, %v, %v) = %v, outside [%v, %v]", i, d, frac, rnd, got, lo, hi)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		value string // "" means no header
		want  time.Duration
		ok    bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{"120", 2 * time.Minute, true},
		{" 30 ", 30 * time.Second, true},
		{"86400", 24 * time.Hour, true},
		{"9223372036", 9223372036 * time.Second, true},
		{"9223372037", 0, false},           // overflows Duration
		{"99999999999999999999", 0, false}, // overflows int64
		{"-5", 0, false},
		{"+5", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"Sat, 01 Mar 2025 12:05:00 GMT", 5 * time.Minute, true},     // IMF-fixdate
		{"Saturday, 01-Mar-25 12:00:30 GMT", 30 * time.Second, true}, // RFC 850
		{"Sat Mar  1 13:00:00 2025", time.Hour, true},                // asctime
		{"Sat, 01 Mar 2025 12:00:00 GMT", 0, true},                   // now
		{"Sat, 01 Mar 2025 11:59:59 GMT", 0, false},                  // past
		{"Sat, 01 Mar 2025 12:05:00 +0100", 0, false},                // not an HTTP date
	}
	for _, tt := range tests {
		h := http.Header{}
		if tt.value != "" {
			h.Set("Retry-After", tt.value)
		}
		got, ok := RetryAfter(h, now)
		if got != tt.want || ok != tt.ok {
			t.Errorf("RetryAfter(%q) = %v, %v; want %v, %v", tt.value, got, ok, tt.want, tt.ok)
		}
	}
}

func TestNext(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	ra := func(v string) http.Header { return http.Header{"Retry-After": {v}} }
	retry := func(status int) Decision { return Classify(status, nil, nil) }
	timeout := Decision{Outcome: Retry, Class: "timeout", Reason: "timeout: i/o timeout"}
	s, m, h := time.Second, time.Minute, time.Hour
	tests := []struct {
		name     string
		schedule []time.Duration
		attempt  int
		d        Decision
		header   http.Header
		maxDelay time.Duration
		want     time.Duration
		ok       bool
	}{
		{"after first attempt", DefaultSchedule, 1, timeout, nil, 0, 5 * s, true},
		{"after second attempt", DefaultSchedule, 2, retry(500), nil, 0, 5 * m, true},
		{"after seventh attempt", DefaultSchedule, 7, retry(502), nil, 0, 10 * h, true},
		{"exhausted", DefaultSchedule, 8, retry(500), nil, 0, 0, false},
		{"success", DefaultSchedule, 1, retry(200), nil, 0, 0, false},
		{"fail", DefaultSchedule, 1, retry(404), nil, 0, 0, false},
		{"gone", DefaultSchedule, 1, retry(410), nil, 0, 0, false},
		{"429 retry-after longer", DefaultSchedule, 1, retry(429), ra("120"), 0, 2 * m, true},
		{"503 retry-after longer", DefaultSchedule, 2, retry(503), ra("3600"), 0, h, true},
		{"503 retry-after date", DefaultSchedule, 1, retry(503), ra("Sat, 01 Mar 2025 12:10:00 GMT"), 0, 10 * m, true},
		{"429 retry-after shorter never shortens", DefaultSchedule, 3, retry(429), ra("1"), 0, 30 * m, true},
		{"429 retry-after garbage", DefaultSchedule, 1, retry(429), ra("later"), 0, 5 * s, true},
		{"429 retry-after capped default 24h", DefaultSchedule, 1, retry(429), ra("604800"), 0, 24 * h, true},
		{"429 retry-after capped configured", DefaultSchedule, 1, retry(429), ra("7200"), h, h, true},
		{"429 retry-after does not extend exhausted schedule", DefaultSchedule, 8, retry(429), ra("10"), 0, 0, false},
		{"500 retry-after ignored", DefaultSchedule, 1, retry(500), ra("600"), 0, 5 * s, true},
		{"302 retry-after ignored", DefaultSchedule, 1, retry(302), ra("600"), 0, 5 * s, true},
		{"schedule capped", DefaultSchedule, 6, timeout, nil, 2 * h, 2 * h, true},
		{"custom schedule", Exponential(s, m, 4), 3, timeout, nil, 0, 4 * s, true},
		{"negative attempt", DefaultSchedule, -1, timeout, nil, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := Next(tt.schedule, tt.attempt, tt.d, tt.header, now, tt.maxDelay)
			if got != tt.want || ok != tt.ok {
				t.Errorf("Next(attempt %d, %v) = %v, %v; want %v, %v", tt.attempt, tt.d, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func ExampleNext() {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	header := http.Header{"Retry-After": {"120"}}
	d := Classify(http.StatusTooManyRequests, header, nil)
	delay, ok := Next(DefaultSchedule, 1, d, header, now, 0)
	fmt.Println(d.Outcome, d.Reason)
	fmt.Println(delay, ok)
	// Output:
	// retry HTTP 429 Too Many Requests
	// 2m0s true
}
