package limiter

import (
	"math"
	"sync"
	"time"
)

// Limit is a token-bucket rate limit.
type Limit struct {
	// Rate is the refill rate in tokens (deliveries) per second. Zero, a
	// negative value, NaN, +Inf or anything from 1e9 up means unlimited.
	Rate float64
	// Burst is the bucket size in tokens: how many may be taken at once
	// after a quiet period. Zero or negative means max(1, ceil(Rate)).
	Burst int
}

// maxRate is the first rate at which a token is earned every nanosecond or
// faster, which the clock cannot resolve; it and anything above count as
// unlimited.
const maxRate = 1e9

// maxWait bounds waits so that float-to-Duration conversion stays defined;
// about 146 years.
const maxWait = time.Duration(1 << 62)

// Unlimited reports whether l imposes no limit.
func (l Limit) Unlimited() bool {
	return !(l.Rate > 0 && l.Rate < maxRate)
}

// normalize returns l with the Burst default applied, or the zero Limit if
// l is unlimited.
func (l Limit) normalize() Limit {
	if l.Unlimited() {
		return Limit{}
	}
	if l.Burst <= 0 {
		l.Burst = max(1, int(math.Ceil(l.Rate)))
	}
	return l
}

// bucket is a token bucket: it held tokens at last, and earns rate tokens
// per nanosecond since, up to burst.
//
// Whether a token is available is decided by comparing whole nanoseconds
// (elapsed >= need), and the wait is the difference of the same two
// numbers, so a refusal's wait is exact by construction whatever the float
// rounding in need.
type bucket struct {
	limit  Limit   // normalized
	rate   float64 // tokens per nanosecond
	burst  float64
	tokens float64 // at last; may be a hair below 0 from float rounding
	last   time.Time
}

func newBucket(l Limit, now time.Time) *bucket {
	b := &bucket{last: now}
	b.setLimit(l)
	b.tokens = b.burst
	return b
}

func (b *bucket) setLimit(l Limit) {
	b.limit = l
	b.rate = l.Rate / float64(time.Second)
	b.burst = float64(l.Burst)
}

// elapsed returns the time since last, or 0 for a now before last: a caller
// with a slightly stale clock earns nothing, and last never moves back.
func (b *bucket) elapsed(now time.Time) time.Duration {
	return max(0, now.Sub(b.last))
}

// at returns the tokens the bucket holds at now.
func (b *bucket) at(now time.Time) float64 {
	return min(b.burst, b.tokens+b.rate*float64(b.elapsed(now)))
}

// check reports whether a token is available at now and, if not, how long
// until one is.
func (b *bucket) check(now time.Time) (ok bool, wait time.Duration) {
	if b.tokens >= 1 {
		return true, 0
	}
	need := durationOf(math.Ceil((1 - b.tokens) / b.rate))
	// Unclamped: a stale now waits for the time it is behind, too.
	el := now.Sub(b.last)
	if el >= need {
		return true, 0
	}
	return false, need - el
}

// take removes one token at now; check must have said yes.
func (b *bucket) take(now time.Time) {
	b.tokens = b.at(now) - 1
	if now.After(b.last) {
		b.last = now
	}
}

// reconfigure switches to l at now, keeping the tokens earned so far capped
// to the new burst; they earn at the new rate from now on.
func (b *bucket) reconfigure(l Limit, now time.Time) {
	if l == b.limit {
		return
	}
	tokens := b.at(now)
	if now.After(b.last) {
		b.last = now
	}
	b.setLimit(l)
	b.tokens = min(tokens, b.burst)
}

// durationOf converts f nanoseconds to a Duration, clamped to [0, maxWait]
// because converting an out-of-range float to an integer is undefined.
func durationOf(f float64) time.Duration {
	return time.Duration(max(0, min(f, float64(maxWait))))
}

// Set is a concurrency-safe collection of token buckets keyed by string,
// such as endpoint ids or tenant ids. A key with no bucket is unlimited.
//
// Use [NewSet], or the two Sets of a [Limiter], which share its lock; the
// zero Set is not ready.
type Set struct {
	mu      *sync.Mutex // shared with the other Set of a Limiter
	buckets map[string]*bucket
}

// NewSet returns an empty Set with its own lock.
func NewSet() *Set {
	return &Set{mu: new(sync.Mutex), buckets: make(map[string]*bucket)}
}

// Configure creates or reconfigures the bucket for key at now. A new bucket
// starts full. An existing bucket keeps the tokens it has earned, capped to
// the new burst, and earns at the new rate from now on. An unlimited l
// removes the bucket. Configuring the limit a bucket already has changes
// nothing.
func (s *Set) Configure(key string, l Limit, now time.Time) {
	l = l.normalize()
	s.mu.Lock()
	defer s.mu.Unlock()
	if l.Unlimited() {
		delete(s.buckets, key)
		return
	}
	if b := s.buckets[key]; b != nil {
		b.reconfigure(l, now)
		return
	}
	s.buckets[key] = newBucket(l, now)
}

// Remove drops the bucket for key, which becomes unlimited.
func (s *Set) Remove(key string) {
	s.mu.Lock()
	delete(s.buckets, key)
	s.mu.Unlock()
}

// Len returns the number of buckets, that is of limited keys.
func (s *Set) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.buckets)
}

// Limit returns key's limit with the Burst default applied, and whether key
// has a bucket. An unknown key returns the zero Limit, which is unlimited.
func (s *Set) Limit(key string) (Limit, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.buckets[key]; b != nil {
		return b.limit, true
	}
	return Limit{}, false
}

// Tokens returns the tokens key's bucket would hold at now, fractional
// tokens included, and whether key has a bucket. It changes nothing.
func (s *Set) Tokens(key string, now time.Time) (float64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.buckets[key]; b != nil {
		return max(0, b.at(now)), true
	}
	return 0, false
}

// Take takes one token from key's bucket at now. When it cannot, it takes
// nothing and returns how long until a token will be there.
func (s *Set) Take(now time.Time, key string) (ok bool, wait time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buckets[key]
	if b == nil {
		return true, 0
	}
	if ok, wait = b.check(now); ok {
		b.take(now)
	}
	return ok, wait
}

// Limiter owns the endpoint buckets and the tenant buckets behind one lock,
// so that [Limiter.Take] can take from both atomically without any lock
// ordering to get wrong.
type Limiter struct {
	mu        sync.Mutex
	endpoints Set
	tenants   Set
}

// New returns a Limiter with no limits. The zero Limiter is not ready.
func New() *Limiter {
	l := &Limiter{}
	l.endpoints = Set{mu: &l.mu, buckets: make(map[string]*bucket)}
	l.tenants = Set{mu: &l.mu, buckets: make(map[string]*bucket)}
	return l
}

// Endpoints returns the buckets keyed by endpoint id.
func (l *Limiter) Endpoints() *Set { return &l.endpoints }

// Tenants returns the buckets keyed by tenant id.
func (l *Limiter) Tenants() *Set { return &l.tenants }

// Take takes one token from the endpoint's bucket and one from the tenant's
// bucket at now, or none from either. A key with no bucket (including "")
// is unlimited. When ok is false, wait is how long until both buckets will
// have a token, assuming nobody else takes one meanwhile.
func (l *Limiter) Take(now time.Time, endpoint, tenant string) (ok bool, wait time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	eb := l.endpoints.buckets[endpoint]
	tb := l.tenants.buckets[tenant]
	eok, ewait := true, time.Duration(0)
	if eb != nil {
		eok, ewait = eb.check(now)
	}
	tok, twait := true, time.Duration(0)
	if tb != nil {
		tok, twait = tb.check(now)
	}
	if !eok || !tok {
		return false, max(ewait, twait)
	}
	if eb != nil {
		eb.take(now)
	}
	if tb != nil {
		tb.take(now)
	}
	return true, 0
}
