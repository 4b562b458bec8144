package relay

import (
	"sync"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/outbox-relay/outbox-relay/limiter"
)

// fifo is a slice-backed queue that reuses its storage.
type fifo[T any] struct {
	items []T
	head  int
}

func (q *fifo[T]) len() int { return len(q.items) - q.head }

func (q *fifo[T]) push(v T) { q.items = append(q.items, v) }

func (q *fifo[T]) pop() T {
	var zero T
	v := q.items[q.head]
	q.items[q.head] = zero
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	} else if q.head > 64 && q.head*2 > len(q.items) {
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	return v
}

// endpointQueue holds the deliveries waiting for one endpoint.
type endpointQueue struct {
	ep       *Endpoint
	tenant   *tenantQueue
	items    fifo[*delivery]
	inFlight int
	queued   bool // in tenant.ready
	breaker  *breaker

	parkedUntil time.Time // breaker open or limit reached: not ready before
	parkIdx     int       // index in scheduler.parked, -1 when not parked

	lane *lane // non-nil while the endpoint is ordered (see lane.go)

	held    fifo[heldRef] // waiting without payload, after items (hold.go)
	filling int           // taken from held, payloads being read
}

func (q *endpointQueue) maxInFlight(def int) int {
	if q.lane != nil {
		return 1
	}
	if q.ep != nil && q.ep.MaxInFlight > 0 {
		return q.ep.MaxInFlight
	}
	return def
}

// tenantQueue groups a tenant's endpoints that have work ready.
type tenantQueue struct {
	id       string
	weight   int
	ready    fifo[*endpointQueue]
	queued   bool // in scheduler.ready
	inFlight int  // deliveries of the tenant handed to workers and not done
}

// scheduler owns the in-memory queues: bounded in deliveries and bytes,
// one queue per endpoint, served round robin across tenants (a tenant of
// weight w gets up to w picks per turn) and across a tenant's endpoints.
// Workers block in next; nothing else in the relay waits on it.
type scheduler struct {
	mu     sync.Mutex
	work   *sync.Cond
	idle   int
	closed bool

	endpoints map[string]*endpointQueue
	tenants   map[string]*tenantQueue
	ready     fifo[*tenantQueue]
	cur       *tenantQueue // tenant being served, with credit picks left
	credit    int

	count, bytes       int
	active             int // endpoint queues with deliveries waiting
	busy               int // deliveries handed to workers and not done
	maxCount, maxBytes int
	maxInFlight        int
	// tenantMaxInFlight bounds one tenant's deliveries in flight (0: no
	// bound). Below the worker count, it keeps workers free for other
	// tenants: an attempt cannot be taken back, so a tenant whose slow
	// receiver held every worker would make the others wait for its
	// answers, however fair the picking.
	tenantMaxInFlight int
	room              chan struct{} // signalled when space frees up

	now            func() time.Time
	limits         *limiter.Limiter // nil = no limits
	parked         parkHeap
	parkKick       chan struct{}
	breakerChanged func(epID string, from, to gobreaker.State) // nil = no breakers

	// tripped holds the endpoints whose breaker is not closed, kept by
	// the breakers' state callbacks, so the loader looks at those and not
	// at every endpoint. Its lock is taken last (callbacks run under a
	// breaker's lock, the loader under mu).
	trippedMu sync.Mutex
	tripped   map[string]bool
	evicted   func(ds []*delivery, until time.Time) // nil = keep parked deliveries in memory

	// Ordered endpoints (lane.go).
	lanes     map[string]*endpointQueue // the queues with a lane
	lanesOpen bool                      // lanes may load rows (after a restart: once the replay caught up)
	laneKick  chan struct{}             // wakes the lane loader
	toRows    func(ds []*delivery)      // writes deliveries as rows, without waiting; called under mu; nil in unit tests
	loadSoon  func()                    // asks the general loader to look soon; nil in unit tests

	// Held deliveries (hold.go): at most maxHeld (0: none), in the queues
	// of holding.
	held, heldTotal, maxHeld int
	filling                  int // taken from held lists, not queued yet
	holding                  map[*endpointQueue]struct{}
	fillKick                 chan struct{} // wakes the filler
}

func newScheduler(maxCount, maxBytes, maxInFlight int) *scheduler {
	s := &scheduler{
		endpoints:   make(map[string]*endpointQueue),
		tenants:     make(map[string]*tenantQueue),
		maxCount:    maxCount,
		maxBytes:    maxBytes,
		maxInFlight: maxInFlight,
		room:        make(chan struct{}, 1),
		now:         time.Now,
		parkKick:    make(chan struct{}, 1),
		lanes:       make(map[string]*endpointQueue),
		laneKick:    make(chan struct{}, 1),
		tripped:     make(map[string]bool),
		fillKick:    make(chan struct{}, 1),
		holding:     make(map[*endpointQueue]struct{}),
	}
	s.work = sync.NewCond(&s.mu)
	return s
}

func (s *scheduler) newQueueLocked(ep *Endpoint, tenant string) *endpointQueue {
	q := &endpointQueue{ep: ep, tenant: s.tenantLocked(tenant), parkIdx: -1}
	if s.breakerChanged != nil && ep != nil {
		q.breaker = newBreaker(ep, s.breakerChange)
	}
	if ep != nil && ep.Ordered {
		s.startLaneLocked(q)
	}
	return q
}

func (s *scheduler) tenantLocked(id string) *tenantQueue {
	t := s.tenants[id]
	if t == nil {
		t = &tenantQueue{id: id, weight: 1}
		s.tenants[id] = t
	}
	return t
}

// setEndpoint installs a new version of an endpoint's config. Queued
// deliveries stay queued and use the new config on their next attempt,
// unless the endpoint can no longer be used (disabled or invalid): then
// they are taken out and returned, for the caller to record why.
func (s *scheduler) setEndpoint(ep *Endpoint) []*delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.limits != nil {
		s.limits.Endpoints().Configure(ep.ID, ep.Limit, s.now())
	}
	q := s.endpoints[ep.ID]
	if q == nil {
		s.endpoints[ep.ID] = s.newQueueLocked(ep, ep.TenantID)
		return nil
	}
	q.ep = ep
	if s.breakerChanged != nil && (q.breaker == nil || !q.breaker.sameSettings(ep)) {
		q.breaker = newBreaker(ep, s.breakerChange)
		s.setTripped(ep.ID, false) // a new breaker starts closed
	}
	switch {
	case ep.Ordered && q.lane == nil:
		s.spillHeldLocked(q, s.now()) // the lane reads the endpoint's rows
		s.startLaneLocked(q)
	case !ep.Ordered && q.lane != nil:
		s.stopLaneLocked(q)
	}
	if q.lane != nil {
		s.setLaneEndpointLocked(q)
		return nil
	}
	if ep.Enabled && ep.Invalid == "" {
		s.makeReadyLocked(q)
		return nil
	}
	var out []*delivery
	for q.items.len() > 0 {
		d := s.popLocked(q)
		out = append(out, d)
	}
	s.spillHeldLocked(q, s.now())
	s.signalRoomLocked()
	return out
}

// removeEndpoint forgets a deleted endpoint. Deliveries still queued for
// it are returned so the caller can record why they end.
func (s *scheduler) removeEndpoint(id string) []*delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.endpoints[id]
	if q == nil {
		return nil
	}
	var out []*delivery
	for q.items.len() > 0 {
		d := s.popLocked(q)
		out = append(out, d)
	}
	s.spillHeldLocked(q, s.now())
	if q.inFlight == 0 {
		delete(s.endpoints, id)
		s.setTripped(id, false)
	}
	if q.lane != nil {
		// The rows left in the table are the general loader's now, which
		// rejects them: the endpoint is unknown.
		delete(s.lanes, id)
		q.lane = nil
		s.wantLoadLocked()
	}
	s.signalRoomLocked()
	return out
}

func (s *scheduler) setTenantWeight(id string, weight int) {
	s.mu.Lock()
	s.tenantLocked(id).weight = max(1, weight)
	s.mu.Unlock()
}

// hasRoom reports whether n more deliveries fit.
func (s *scheduler) hasRoom(n int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count+n <= s.maxCount && s.bytes < s.maxBytes
}

// space returns how many deliveries fit now.
func (s *scheduler) space() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bytes >= s.maxBytes {
		return 0
	}
	return max(0, s.maxCount-s.count)
}

func (s *scheduler) idleWorkers() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idle
}

func (s *scheduler) inFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.busy
}

func (s *scheduler) len() (count, bytes int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count, s.bytes
}

// push queues deliveries; each must carry its endpoint in d.ep. With fit
// set, it stops at the bounds and returns the deliveries that did not fit.
func (s *scheduler) push(ds []*delivery, fit bool) (rest []*delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	added := false
	for i, d := range ds {
		if fit && (s.count >= s.maxCount || s.bytes >= s.maxBytes) {
			rest = ds[i:]
			break
		}
		q := s.queueForPushLocked(d)
		if q == nil {
			continue
		}
		if q.held.len() > 0 && s.holdLocked(q, d) {
			continue // behind the endpoint's held deliveries
		}
		s.pushLocked(q, d)
		s.makeReadyLocked(q)
		added = true
	}
	// Wake one worker; each worker that finds more work wakes the next
	// (see next), so a burst fans out without one signal per delivery.
	if added && s.idle > 0 {
		s.work.Signal()
	}
	return rest
}

// underShare reports whether ds holds a delivery of an endpoint below
// its share of the queue bound (shareLocked): not the endpoint that fills
// the queues, so its events must not wait behind it. The only endpoint
// with deliveries queued is never under: whatever fills the queues is
// its own, even when the workers have just taken a few and it holds a
// little less than the whole bound.
func (s *scheduler) underShare(ds []*delivery) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range ds {
		n, share := s.shareLocked(s.endpoints[d.endpointID], 0)
		if n < share && (n == 0 || s.active > 1) {
			return true
		}
	}
	return false
}

// shareLocked returns how many deliveries q holds (q may be nil: none)
// and its share of the queue bound: the bound divided by the endpoints
// with deliveries queued, q counted, or by busy if that is more.
func (s *scheduler) shareLocked(q *endpointQueue, busy int) (n, share int) {
	active := s.active
	if q != nil {
		n = q.items.len()
	}
	if n == 0 {
		active++
	}
	return n, max(1, s.maxCount/max(1, active, busy))
}

// queueForPushLocked returns the queue d goes to, creating it, or nil
// when d's endpoint is ordered: then offLaneLocked has dealt with d (its
// lane loads it from the table), and d must not enter memory.
func (s *scheduler) queueForPushLocked(d *delivery) *endpointQueue {
	q := s.endpoints[d.endpointID]
	if q == nil {
		q = s.newQueueLocked(d.ep, d.tenantID)
		s.endpoints[d.endpointID] = q
	}
	if q.lane != nil {
		s.offLaneLocked(d)
		return nil
	}
	return q
}

func (s *scheduler) pushLocked(q *endpointQueue, d *delivery) {
	if q.items.len() == 0 {
		s.active++
	}
	q.items.push(d)
	s.count++
	s.bytes += d.size()
}

func (s *scheduler) popLocked(q *endpointQueue) *delivery {
	d := q.items.pop()
	if q.items.len() == 0 {
		s.active--
	}
	s.count--
	s.bytes -= d.size()
	s.wantFillLocked(q)
	return d
}

// pushShare queues deliveries when the queues are full: a delivery whose
// endpoint holds less than its share of the bound (the bound divided by
// the endpoints with work waiting, or busy lately, whichever is more) is
// queued anyway, up to twice the bound in all. The others are held in
// memory without their payload (hold.go) or, past that bound, returned:
// to be spilled (spill) when their endpoint holds far more than the
// others do on average, so an endpoint that does not drain cannot keep
// others' events in the WAL; to wait for room (wait) otherwise, because a
// backlog spread evenly over many endpoints puts every one of them at its
// share, and spilling it would only write it twice while the workers
// drain it anyway. With force, every delivery that is not queued spills.
func (s *scheduler) pushShare(ds []*delivery, busy int, force bool) (spill, wait []*delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	added := false
	for _, d := range ds {
		q := s.queueForPushLocked(d)
		if q == nil {
			continue
		}
		if q.held.len() > 0 && s.holdLocked(q, d) {
			continue
		}
		n, share := s.shareLocked(q, busy)
		if n < share && s.count < 2*s.maxCount && s.bytes < 2*s.maxBytes {
			s.pushLocked(q, d)
			s.makeReadyLocked(q)
			added = true
			continue
		}
		otherActive := s.active
		if n > 0 {
			otherActive--
		}
		average := (s.count - n) / max(1, otherActive)
		if force || n > heavyFactor*average+heavySlack {
			if s.holdLocked(q, d) {
				continue
			}
			spill = append(spill, d)
		} else {
			wait = append(wait, d)
		}
	}
	if added && s.idle > 0 {
		s.work.Signal()
	}
	return spill, wait
}

// An endpoint holding more than heavyFactor times the others' average
// queue, plus heavySlack, is the reason the queues are full.
const (
	heavyFactor = 4
	heavySlack  = 16
)

// makeReadyLocked puts q on its tenant's ready list if it can be served.
func (s *scheduler) makeReadyLocked(q *endpointQueue) bool {
	if q.queued || q.items.len() == 0 || q.parkIdx >= 0 || q.inFlight >= q.maxInFlight(s.maxInFlight) {
		return false
	}
	q.queued = true
	t := q.tenant
	t.ready.push(q)
	s.tenantReadyLocked(t)
	return true
}

// tenantReadyLocked puts t on the ready list if it has endpoints ready and
// room under its in-flight bound; it reports whether it is there.
func (s *scheduler) tenantReadyLocked(t *tenantQueue) bool {
	if t.queued {
		return true
	}
	if t.ready.len() == 0 || !s.tenantHasRoomLocked(t) {
		return false
	}
	t.queued = true
	s.ready.push(t)
	return true
}

func (s *scheduler) tenantHasRoomLocked(t *tenantQueue) bool {
	return s.tenantMaxInFlight <= 0 || t.inFlight < s.tenantMaxInFlight
}

// releaseLocked returns the in-flight slots an attempt at q held (the
// worker's, q's and q's tenant's); it reports whether that made the
// tenant ready again. q is never forgotten while an attempt is in flight
// (removeEndpoint keeps it), and its tenant never changes.
func (s *scheduler) releaseLocked(q *endpointQueue) bool {
	s.busy--
	q.inFlight--
	t := q.tenant
	atBound := !s.tenantHasRoomLocked(t)
	t.inFlight--
	return atBound && !t.queued && s.tenantReadyLocked(t)
}

// next blocks until a delivery is ready and returns it, or returns nil
// once the scheduler is closed.
func (s *scheduler) next() *delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if s.closed {
			return nil
		}
		if d := s.pickLocked(); d != nil {
			if s.idle > 0 && (s.ready.len() > 0 || (s.cur != nil && s.cur.ready.len() > 0)) {
				s.work.Signal()
			}
			return d
		}
		s.idle++
		s.work.Wait()
		s.idle--
	}
}

func (s *scheduler) pickLocked() *delivery {
	for {
		t := s.cur
		if t == nil || s.credit <= 0 || t.ready.len() == 0 || !s.tenantHasRoomLocked(t) {
			if t != nil {
				s.tenantReadyLocked(t) // its turn is over; back in line if it can go on
			}
			s.cur = nil
			if s.ready.len() == 0 {
				return nil
			}
			t = s.ready.pop()
			t.queued = false
			if !s.tenantHasRoomLocked(t) {
				continue // a release puts it back
			}
			s.cur, s.credit = t, t.weight
			continue
		}
		q := t.ready.pop()
		q.queued = false
		if q.items.len() == 0 || q.parkIdx >= 0 || q.inFlight >= q.maxInFlight(s.maxInFlight) {
			continue
		}
		now := s.now()
		done, wait, evict := s.admitLocked(q, now)
		if wait > 0 {
			s.parkLocked(q, now.Add(wait))
			if evict {
				s.evictLocked(q, now.Add(wait))
			}
			continue
		}
		d := s.popLocked(q)
		d.ep = q.ep // the config in force for this attempt
		d.breakerDone = done
		d.queue = q  // kept in s.endpoints while in flight (releaseLocked)
		t.inFlight++ // t is q.tenant: q came off its ready list
		q.inFlight++
		s.busy++
		s.credit--
		s.makeReadyLocked(q)
		if s.count < s.maxCount/2 {
			s.signalRoomLocked()
		}
		return d
	}
}

// done returns a delivery's in-flight slot. For an ordered endpoint it
// keeps the slot and returns true: the caller hands the outcome to the
// writer first and then calls finish (see lane.go for why).
func (s *scheduler) done(d *delivery) (finishLater bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := d.queue
	if q.lane != nil {
		return true
	}
	d.queue = nil
	woke := s.releaseLocked(q)
	if (s.makeReadyLocked(q) || woke) && s.idle > 0 {
		s.work.Signal()
	}
	return false
}

func (s *scheduler) signalRoomLocked() {
	select {
	case s.room <- struct{}{}:
	default:
	}
}

// waitRoom blocks until n deliveries fit, done is closed, or the timeout
// passes; it reports whether they fit. It looks every 10ms as well as on
// the room signal, which only fires once the queues are half empty.
func (s *scheduler) waitRoom(n int, done <-chan struct{}, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !s.hasRoom(min(n, s.maxCount)) {
		select {
		case <-s.room:
		case <-tick.C:
		case <-done:
			return false
		case <-deadline.C:
			return false
		}
	}
	return true
}

func (s *scheduler) close() {
	s.mu.Lock()
	s.closed = true
	s.work.Broadcast()
	s.mu.Unlock()
	select {
	case s.parkKick <- struct{}{}:
	default:
	}
}
