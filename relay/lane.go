package relay

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Ordered endpoints (relay.endpoints.ordered): deliveries to such an
// endpoint are attempted one at a time, in commit order, which is
// (commit_lsn, event_seq): the transaction's commit position in the WAL,
// then the outbox row's position within the transaction.
//
// The design is deliberately simple: for an ordered endpoint the table is
// the queue. Every delivery routed to it is written as a pending row (in
// the status batch, like a spilled one), and its lane loads the endpoint's
// oldest unfinished rows back, in order, a batch at a time, into its
// in-memory queue, which hands out one delivery at a time. The invariants:
//
//  1. One in flight. A lane queue's in-flight bound is 1, whatever
//     max_in_flight and the worker count say, and its slot is held until
//     the attempt's outcome is in the status writer (done, then finish).
//  2. Only the lane fills a lane queue: its items are rows it loaded, in
//     order, oldest first, with nothing unfinished older than them. Rows
//     for an ordered endpoint that reach push by another way (the general
//     loader, a race with a config change) are left in the table (or
//     written to it) for the lane, never queued.
//  3. Rows of an ordered endpoint reach the writer in commit order: the
//     dispatcher writes them with the batch they were routed in (splitLanes,
//     in routing order), the writer writes rows in the order they were
//     added, one batch per transaction. So at any moment the table holds
//     a prefix, in commit order, of the endpoint's deliveries; anything not
//     yet durable is newer than everything that is.
//  4. A lane loads only when it is idle: nothing of its endpoint in memory
//     or in flight, no load under way. And before reading the table it
//     waits until every row handed to the writer before that moment is
//     durable (writer.sync). With 1, every outcome of the endpoint is then
//     in the table, so "the oldest unfinished rows" is the truth.
//  5. A retryable failure keeps the head the head: the rest of the batch
//     leaves memory (it is in the table), and the lane loads again when
//     the head's next_attempt_at has come, holding no worker meanwhile. A
//     head an open circuit holds back leaves memory the same way
//     (evictLaneLocked); one a rate limit holds back stays, parked until
//     the next token.
//  6. A head that ends failed (a final 4xx), dead (attempts exhausted) or
//     rejected is final: it is in relay.dead_letters and the lane moves
//     on to the next delivery. Replaying it later puts it back at the head
//     of the lane (it is the oldest unfinished row), out of order with the
//     deliveries that went before.
//  7. After a restart, lanes load nothing until the stream has handed over
//     every transaction at or below the recorded LSN (openLanes): rows of
//     events that were in the writer at the crash are routed again first,
//     so no newer row can overtake them. A delivery in flight at the crash
//     is still pending in the table and goes first again (a repeat, with
//     its webhook-id); no delivery is attempted for the first time after a
//     newer one.
//  8. The watermark never waits for a lane: an ordered delivery's pending
//     row is its durable record from the start, under spill and block
//     alike.
//
// Turning ordered on (UPDATE ... SET ordered = true) is in force from the
// change's commit position in the stream: deliveries queued in memory
// become pending rows, those already pending or retrying join the order
// by their commit position, and the lane starts once the attempts in
// flight at the change have ended. Turning it off makes the lane's queue an
// ordinary one; the rows left are claimed by the general loader, as due.
//
// The general loader never claims a lane's rows (claimDue leaves them
// out; it still walks past those the lane has not loaded in
// deliveries_due_unclaimed_idx, which costs it time in proportion to a
// lane's backlog) and the lane ignores claimed_until (only one relay is active per
// slot, and invariants 2 and 4 keep two copies of a delivery out of
// memory); it still sets it, so rows it holds are left alone by the general
// loader if the endpoint stops being ordered.

// laneBatch is the most rows one lane loads at a time.
const laneBatch = 500

// lane is an ordered endpoint's loading state, guarded by scheduler.mu.
type lane struct {
	loading   bool      // the lane loader is reading its rows
	notBefore time.Time // the head waits (a retry, an open breaker) until then
	size      int       // rows to load next: halved when a batch is dropped, doubled when one drains
}

// startLaneLocked makes q's endpoint ordered. Deliveries queued in memory
// leave it: rows already in the table stay there for the lane, the others
// are written as pending rows now (under the lock, so before the lane can
// load; invariant 4).
func (s *scheduler) startLaneLocked(q *endpointQueue) {
	q.lane = &lane{size: laneBatch}
	s.lanes[q.ep.ID] = q
	var rows []*delivery
	now := s.now()
	for q.items.len() > 0 {
		if d := s.popLocked(q); !d.persisted {
			d.state, d.nextAttempt = StatePending, now
			rows = append(rows, d)
		}
	}
	if len(rows) > 0 && s.toRows != nil {
		s.toRows(rows)
	}
	s.signalRoomLocked()
	s.kickLanesLocked()
}

// stopLaneLocked makes q's endpoint ordinary again: what the lane loaded
// stays queued (claimed, so the general loader leaves those rows alone),
// and the general loader is asked to look for the rest.
func (s *scheduler) stopLaneLocked(q *endpointQueue) {
	delete(s.lanes, q.ep.ID)
	q.lane = nil
	s.makeReadyLocked(q)
	s.wantLoadLocked()
}

// setLaneEndpointLocked applies a new config version to a lane. If the
// endpoint can no longer be used, the loaded rows leave memory: the lane
// loads them again and ends them, in order, with the reason.
func (s *scheduler) setLaneEndpointLocked(q *endpointQueue) {
	if _, _, refused := q.ep.refusal(); refused {
		for q.items.len() > 0 {
			s.popLocked(q)
		}
		s.signalRoomLocked()
	} else {
		s.makeReadyLocked(q)
	}
	s.kickLanesLocked()
}

// offLaneLocked deals with a delivery pushed for an ordered endpoint
// (invariant 2): a loaded row stays in the table for the lane; a fresh one
// is written as a pending row. Routing sends fresh ones through splitLanes,
// so the second case is a safety net.
func (s *scheduler) offLaneLocked(d *delivery) {
	if d.persisted || s.toRows == nil {
		return
	}
	d.state, d.nextAttempt = StatePending, s.now()
	s.toRows([]*delivery{d})
	s.kickLanesLocked()
}

// splitLanes takes the deliveries for ordered endpoints out of ds, as
// pending rows for the caller to write, in order (invariant 3); the others
// stay in ds, in order.
func (s *scheduler) splitLanes(ds []*delivery, now time.Time) (rest, rows []*delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rest = ds[:0]
	for _, d := range ds {
		q := s.endpoints[d.endpointID]
		if q == nil && d.ep != nil && d.ep.Ordered {
			q = s.newQueueLocked(d.ep, d.tenantID)
			s.endpoints[d.endpointID] = q
		}
		if q != nil && q.lane != nil {
			d.state, d.nextAttempt = StatePending, now
			rows = append(rows, d)
			continue
		}
		rest = append(rest, d)
	}
	clear(ds[len(rest):])
	return rest, rows
}

// finish returns the in-flight slot of a delivery whose done said
// finishLater, once its outcome is with the writer (invariant 1).
func (s *scheduler) finish(d *delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := d.queue
	d.queue = nil
	woke := s.releaseLocked(q)
	if l := q.lane; l != nil {
		if !d.state.Final() {
			// Invariant 5: the head stays the head.
			s.dropLaneItemsLocked(q)
			if d.fromLane {
				l.notBefore = d.nextAttempt
			}
		} else if q.items.len() == 0 && d.fromLane {
			l.size = min(laneBatch, 2*l.size)
		}
		if q.items.len() == 0 && q.inFlight == 0 {
			s.kickLanesLocked()
		}
	}
	if (s.makeReadyLocked(q) || woke) && s.idle > 0 {
		s.work.Signal()
	}
}

// evictLaneLocked: the lane's head is held back until until (an open
// circuit). The loaded rows leave memory and the lane loads them again
// then.
func (s *scheduler) evictLaneLocked(q *endpointQueue, until time.Time) {
	s.dropLaneItemsLocked(q)
	q.lane.notBefore = until
	s.kickLanesLocked()
}

func (s *scheduler) dropLaneItemsLocked(q *endpointQueue) {
	if q.items.len() == 0 {
		return
	}
	for q.items.len() > 0 {
		s.popLocked(q)
	}
	q.lane.size = max(8, q.lane.size/2)
	s.signalRoomLocked()
}

func (s *scheduler) kickLanes() {
	s.mu.Lock()
	s.kickLanesLocked()
	s.mu.Unlock()
}

func (s *scheduler) kickLanesLocked() {
	select {
	case s.laneKick <- struct{}{}:
	default:
	}
}

func (s *scheduler) wantLoadLocked() {
	if s.loadSoon != nil {
		s.loadSoon()
	}
}

// openLanes lets lanes load (invariant 7).
func (s *scheduler) openLanes() {
	s.mu.Lock()
	s.lanesOpen = true
	s.kickLanesLocked()
	s.mu.Unlock()
}

// endpointForLoad returns an endpoint's current config for the general
// loader, and whether the endpoint is ordered (the loaded row is then left
// to its lane).
func (s *scheduler) endpointForLoad(id string) (ep *Endpoint, ordered bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if q := s.endpoints[id]; q != nil {
		return q.ep, q.lane != nil
	}
	return nil, false
}

// laneLoads are the loads lanesToLoad hands out: for each lane, its
// endpoint and how many rows to read.
type laneLoads struct {
	ids   []string
	sizes []int
	lanes []*lane // a load is for this lane, not for one started since
}

// lanesToLoad marks the idle lanes that may load now as loading and
// returns them with how many rows each should load (invariant 4), and the
// earliest time a waiting lane may load (zero if none waits).
func (s *scheduler) lanesToLoad(now time.Time) (loads laneLoads, next time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.lanesOpen || s.closed {
		return loads, time.Time{}
	}
	room := max(0, s.maxCount-s.count)
	if s.bytes >= s.maxBytes {
		room = 0
	}
	for id, q := range s.lanes {
		l := q.lane
		if l.loading || q.items.len() > 0 || q.inFlight > 0 {
			continue
		}
		if now.Before(l.notBefore) {
			if next.IsZero() || l.notBefore.Before(next) {
				next = l.notBefore
			}
			continue
		}
		l.loading = true
		loads.ids = append(loads.ids, id)
		loads.sizes = append(loads.sizes, l.size)
		loads.lanes = append(loads.lanes, l)
	}
	// A full queue still lets each lane load its head: memory grows with
	// the number of ordered endpoints, never with their backlog.
	if n := len(loads.ids); n > 0 {
		share := max(1, room/n)
		for i := range loads.sizes {
			loads.sizes[i] = min(loads.sizes[i], share)
		}
	}
	return loads, next
}

// laneLoadFailed ends loads that could not read the table.
func (s *scheduler) laneLoadFailed(loads laneLoads) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range loads.lanes {
		l.loading = false
	}
}

// laneLoaded hands each lane the rows read for it (sorted by endpoint, then
// commit order). It queues the due prefix of a lane's rows, or, if even the
// head is not due, records when it is. Rows of an endpoint that can no
// longer be used end with the reason (written before the lane can load
// again). more reports a lane that had more rows than it took and can
// load again at once.
func (s *scheduler) laneLoaded(loads laneLoads, ds []*delivery, now time.Time) (more bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var final []*delivery
	added := false
	for i, id := range loads.ids {
		j := 0
		for j < len(ds) && ds[j].endpointID == id {
			j++
		}
		got := ds[:j]
		ds = ds[j:]
		q := s.endpoints[id]
		switch {
		case q == nil: // deleted meanwhile
			for _, d := range got {
				d.state, d.errText, d.completed = StateRejected, "unknown endpoint "+id, now
				final = append(final, d)
			}
			continue
		case q.lane == nil: // no longer ordered: ordinary claimed deliveries
			for _, d := range got {
				d.ep, d.nextAttempt = q.ep, time.Time{}
				s.pushLocked(q, d)
			}
			s.makeReadyLocked(q)
			added = added || len(got) > 0
			continue
		case q.lane != loads.lanes[i]:
			// Ordered off and on again meanwhile: the new lane may have
			// written older rows since this read. The rows stay in the
			// table for it.
			continue
		}
		l := q.lane
		l.loading = false
		if state, reason, refused := q.ep.refusal(); refused {
			for _, d := range got {
				d.state, d.errText, d.completed = state, reason, now
				final = append(final, d)
			}
			more = more || len(got) == loads.sizes[i]
			continue
		}
		if len(got) == 0 {
			continue
		}
		if got[0].nextAttempt.After(now) {
			l.notBefore = got[0].nextAttempt
			continue
		}
		for k, d := range got {
			if k > 0 && d.nextAttempt.After(now) {
				break // strict order: it waits at the head of a later load
			}
			d.ep, d.fromLane, d.nextAttempt = q.ep, true, time.Time{}
			s.pushLocked(q, d)
		}
		s.makeReadyLocked(q)
		added = true
	}
	if len(final) > 0 && s.toRows != nil {
		s.toRows(final)
	}
	if added && s.idle > 0 {
		s.work.Signal()
	}
	return more
}

// laneRowsSQL reads each lane's oldest unfinished rows straight off
// deliveries_ordered_idx. (Joining them back to the table in an UPDATE
// would not do: the planner cannot see through LIMIT l.n and scans the
// whole table.) laneLeaseSQL then claims them by primary key.
const laneRowsSQL = `
SELECT x.event_id, x.endpoint_id, x.tenant_id, x.event_type, x.attempts,
    -- A row spilled without its payload (before the endpoint was ordered)
    -- reads it from its outbox row.
    COALESCE(x.payload, o.payload)::text,
    CASE WHEN x.payload IS NULL THEN o.headers ELSE x.headers END::text,
    CASE WHEN x.payload IS NULL THEN o.traceparent ELSE x.traceparent END,
    (x.commit_lsn - '0/0')::int8, x.committed_at, x.first_attempt_at, x.next_attempt_at, x.event_seq
FROM unnest($1::text[], $2::int4[]) AS l(id, n)
CROSS JOIN LATERAL (
    SELECT * FROM relay.deliveries d
    WHERE d.endpoint_id = l.id AND d.state IN ('pending', 'retrying')
    ORDER BY d.commit_lsn, d.event_seq
    LIMIT l.n) x
LEFT JOIN relay.outbox o ON x.payload IS NULL AND o.id = x.event_id`

const laneLeaseSQL = `
UPDATE relay.deliveries d SET claimed_until = now() + $3::interval
FROM unnest($1::uuid[], $2::text[]) AS k(event_id, endpoint_id)
WHERE d.event_id = k.event_id AND d.endpoint_id = k.endpoint_id AND d.state IN ('pending', 'retrying')`

// claimLanes reads the oldest unfinished rows of each ordered endpoint in
// ids (sizes[i] of them at most), whatever their claims, claims them, and
// returns them sorted by endpoint (in the order of ids), then commit order.
func claimLanes(ctx context.Context, pool *pgxpool.Pool, ids []string, sizes []int, lease time.Duration) ([]*delivery, error) {
	ns := make([]int32, len(sizes))
	for i, n := range sizes {
		ns[i] = int32(n)
	}
	rows, err := pool.Query(ctx, laneRowsSQL, ids, ns)
	if err != nil {
		return nil, fmt.Errorf("load ordered endpoints' rows: %w", err)
	}
	ds, err := scanClaimed(rows, true)
	if err != nil {
		return nil, fmt.Errorf("load ordered endpoints' rows: %w", err)
	}
	if len(ds) > 0 {
		events, eps := make([][16]byte, len(ds)), make([]string, len(ds))
		for i, d := range ds {
			events[i], eps[i] = d.eventID, d.endpointID
		}
		if _, err := pool.Exec(ctx, laneLeaseSQL, events, eps, lease.String()); err != nil {
			return nil, fmt.Errorf("claim ordered endpoints' rows: %w", err)
		}
	}
	// laneLoaded walks ids in order, each lane's rows in commit order.
	order := make(map[string]int, len(ids))
	for i, id := range ids {
		order[id] = i
	}
	slices.SortFunc(ds, func(a, b *delivery) int {
		return cmp.Or(cmp.Compare(order[a.endpointID], order[b.endpointID]), cmp.Compare(lsnKey(a), lsnKey(b)), cmp.Compare(a.eventSeq, b.eventSeq))
	})
	return ds, nil
}

// lsnKey sorts a row without a commit LSN last, as ORDER BY does.
func lsnKey(d *delivery) uint64 {
	if d.commitLSN == 0 {
		return ^uint64(0)
	}
	return uint64(d.commitLSN)
}

// laneLoop loads the ordered endpoints' rows: when kicked (rows routed to
// a lane, a lane idle again), when a waiting head becomes due, and every
// PollInterval (a dead letter replayed with SQL).
func (r *Relay) laneLoop(ctx context.Context) {
	tick := time.NewTicker(r.cfg.PollInterval)
	defer tick.Stop()
	wake := time.NewTimer(time.Hour)
	defer wake.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-r.sched.laneKick:
		case <-wake.C:
		}
		for ctx.Err() == nil {
			now := r.now()
			loads, next := r.sched.lanesToLoad(now)
			if !next.IsZero() {
				wake.Reset(max(time.Millisecond, next.Sub(now)))
			}
			if len(loads.ids) == 0 {
				break
			}
			more, err := r.loadLanes(ctx, loads)
			if err != nil {
				r.sched.laneLoadFailed(loads)
				if ctx.Err() == nil {
					r.log.Warn("loading ordered endpoints' deliveries failed", slog.Any("error", err))
				}
				break
			}
			if !more {
				break
			}
		}
	}
}

func (r *Relay) loadLanes(ctx context.Context, loads laneLoads) (bool, error) {
	// Invariant 4: every row and outcome of these endpoints handed to the
	// writer so far is in the table before it is read.
	if err := r.writer.sync(ctx); err != nil {
		return false, err
	}
	ds, err := claimLanes(ctx, r.pool, loads.ids, loads.sizes, r.cfg.ClaimLease)
	if err != nil {
		return false, err
	}
	r.metrics.loaded.Add(float64(len(ds)))
	return r.sched.laneLoaded(loads, ds, r.now()), nil
}
