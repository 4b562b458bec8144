package relay

import (
	"container/heap"
	"errors"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
)

// Breaker defaults, overridable per endpoint (breaker_failures,
// breaker_cooldown_ms).
const (
	defaultBreakerFailures = 5
	defaultBreakerCooldown = 30 * time.Second
	// breakerWindow: failures spread over longer than this do not add up
	// to a failure ratio (consecutive failures always count).
	breakerWindow = time.Minute
	// breakerRatioMin and breakerRatio: with at least this many attempts
	// in the window and at least this share failing, the circuit opens.
	breakerRatioMin = 20
	breakerRatio    = 0.5
)

// errAttemptFailed and errNotCounted are what a delivery reports to its
// breaker: a failure that says the receiver is unwell, or an outcome that
// says nothing about it (a 4xx, a blocked address, a shutdown).
var (
	errAttemptFailed = errors.New("attempt failed")
	errNotCounted    = errors.New("not counted")
)

// breaker wraps one endpoint's gobreaker and remembers when it opened, so
// the scheduler can park the endpoint until the cooldown ends instead of
// polling it.
type breaker struct {
	cb       *gobreaker.TwoStepCircuitBreaker[struct{}]
	failures int
	cooldown time.Duration
	openedAt atomic.Int64 // unix nanoseconds of the last transition to open
}

func newBreaker(ep *Endpoint, onChange func(epID string, from, to gobreaker.State)) *breaker {
	b := &breaker{failures: ep.BreakerFailures, cooldown: ep.BreakerCooldown}
	b.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        ep.ID,
		MaxRequests: 1, // half-open: one probe
		Interval:    breakerWindow,
		Timeout:     b.cooldown,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.ConsecutiveFailures >= uint32(b.failures) ||
				(c.Requests >= breakerRatioMin && float64(c.TotalFailures) >= breakerRatio*float64(c.Requests))
		},
		IsExcluded: func(err error) bool { return errors.Is(err, errNotCounted) },
		OnStateChange: func(name string, from, to gobreaker.State) {
			// Runs under the breaker's own lock: record, hand off, no more.
			if to == gobreaker.StateOpen {
				b.openedAt.Store(time.Now().UnixNano())
			}
			onChange(name, from, to)
		},
	})
	return b
}

// sameSettings reports whether ep keeps this breaker's thresholds, so a
// config change that does not touch them keeps the breaker's state.
func (b *breaker) sameSettings(ep *Endpoint) bool {
	return b.failures == ep.BreakerFailures && b.cooldown == ep.BreakerCooldown
}

// parkHeap orders parked endpoint queues by the time they may run again.
type parkHeap []*endpointQueue

func (h parkHeap) Len() int           { return len(h) }
func (h parkHeap) Less(i, j int) bool { return h[i].parkedUntil.Before(h[j].parkedUntil) }
func (h parkHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].parkIdx = i; h[j].parkIdx = j }
func (h *parkHeap) Push(x any)        { q := x.(*endpointQueue); q.parkIdx = len(*h); *h = append(*h, q) }
func (h *parkHeap) Pop() any {
	old := *h
	q := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	q.parkIdx = -1
	return q
}

// parkLocked takes q off the ready lists until t.
func (s *scheduler) parkLocked(q *endpointQueue, t time.Time) {
	if q.parkIdx >= 0 {
		if t.After(q.parkedUntil) {
			q.parkedUntil = t
			heap.Fix(&s.parked, q.parkIdx)
		}
		return
	}
	q.parkedUntil = t
	heap.Push(&s.parked, q)
	if s.parked[0] == q {
		select {
		case s.parkKick <- struct{}{}:
		default:
		}
	}
}

// unparkLoop returns parked queues to the ready lists when their time
// comes. It ends when the scheduler closes.
func (s *scheduler) unparkLoop() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return
		}
		now := s.now()
		woke := false
		for len(s.parked) > 0 && !s.parked[0].parkedUntil.After(now) {
			q := heap.Pop(&s.parked).(*endpointQueue)
			q.parkedUntil = time.Time{}
			if s.makeReadyLocked(q) {
				woke = true
			}
		}
		next := time.Hour
		if len(s.parked) > 0 {
			next = s.parked[0].parkedUntil.Sub(now)
		}
		if woke && s.idle > 0 {
			s.work.Signal()
		}
		s.mu.Unlock()
		timer.Reset(next)
		select {
		case <-timer.C:
		case <-s.parkKick:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		}
	}
}

// admitLocked decides whether q may send one more delivery now: its
// circuit is not open and its endpoint and tenant limits have a token.
// When not, it returns how long to park q. A delivery that is admitted
// carries the breaker's done callback.
//
// evict says the wait is long (an open circuit): the queue's deliveries
// should leave memory as pending rows, so the acknowledgement watermark
// and other tenants do not wait on them.
func (s *scheduler) admitLocked(q *endpointQueue, now time.Time) (done func(error), wait time.Duration, evict bool) {
	if b := q.breaker; b != nil {
		switch b.cb.State() {
		case gobreaker.StateOpen:
			if w := time.Unix(0, b.openedAt.Load()).Add(b.cooldown).Sub(now); w > 0 {
				return nil, w, true
			}
			// Cooldown over: Allow below moves it to half-open.
		case gobreaker.StateHalfOpen:
			// One probe at a time; done() of the probe unparks q.
		}
	}
	if s.limits != nil {
		if ok, w := s.limits.Take(now, q.ep.ID, q.ep.TenantID); !ok {
			// A limited queue drains at its rate: it stays in memory
			// (within its share of the queue; the excess spills), so
			// the next token finds a delivery waiting. Evicting it would
			// leave it to the loader, which only loads when the whole
			// queue has room, and a busy neighbour keeps it full.
			return nil, max(w, time.Millisecond), false
		}
	}
	if b := q.breaker; b != nil {
		d, err := b.cb.Allow()
		if err != nil {
			// Open (a race with the cooldown) or a probe already out:
			// look again shortly.
			return nil, min(b.cooldown, 100*time.Millisecond), false
		}
		return d, 0, false
	}
	return nil, 0, false
}

// evictLocked takes a parked queue's deliveries out of memory and hands
// them to s.evicted to be recorded as pending rows due at until. The head
// stays, to be the probe when the cooldown ends; while the circuit is not
// closed, the loader leaves the endpoint's rows in the table (see
// loadExcluded), so a dead receiver's backlog is not read back and
// written out again every cooldown.
func (s *scheduler) evictLocked(q *endpointQueue, until time.Time) {
	if q.lane != nil {
		s.evictLaneLocked(q, until)
		return
	}
	s.spillHeldLocked(q, until)
	if s.evicted == nil || q.items.len() <= 1 {
		return
	}
	head := s.popLocked(q)
	out := make([]*delivery, 0, q.items.len())
	for q.items.len() > 0 {
		d := s.popLocked(q)
		out = append(out, d)
	}
	s.pushLocked(q, head)
	s.signalRoomLocked()
	s.evicted(out, until)
}

// breakerChange is every breaker's state callback: it keeps the tripped
// set and passes the change on.
func (s *scheduler) breakerChange(epID string, from, to gobreaker.State) {
	s.setTripped(epID, to != gobreaker.StateClosed)
	s.breakerChanged(epID, from, to)
}

func (s *scheduler) setTripped(epID string, tripped bool) {
	s.trippedMu.Lock()
	if tripped {
		s.tripped[epID] = true
	} else {
		delete(s.tripped, epID)
	}
	s.trippedMu.Unlock()
}

// loadExcluded lists the endpoints whose rows the general loader must
// leave alone: ordered endpoints (their lanes load them) and endpoints
// whose circuit is open or probing. probes are those of the latter with
// nothing in memory or in flight and the cooldown over: one loaded row of
// each is its probe, so the loader takes one (claimProbes) instead of a
// batch that would go back to the table when the probe fails.
func (s *scheduler) loadExcluded(now time.Time) (excluded, probes []string) {
	s.trippedMu.Lock()
	tripped := make([]string, 0, len(s.tripped))
	for id := range s.tripped {
		tripped = append(tripped, id)
	}
	s.trippedMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.lanes)+len(tripped))
	for id := range s.lanes {
		ids = append(ids, id)
	}
	for _, id := range tripped {
		q := s.endpoints[id]
		if q == nil || q.breaker == nil || q.lane != nil {
			continue
		}
		b := q.breaker
		switch b.cb.State() {
		case gobreaker.StateClosed:
			continue
		case gobreaker.StateOpen:
			if q.items.len() == 0 && q.inFlight == 0 && !now.Before(time.Unix(0, b.openedAt.Load()).Add(b.cooldown)) {
				probes = append(probes, id)
				continue
			}
		case gobreaker.StateHalfOpen:
			if q.items.len() == 0 && q.inFlight == 0 {
				probes = append(probes, id)
				continue
			}
		}
		ids = append(ids, id)
	}
	return ids, probes
}
