package relay

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sony/gobreaker/v2"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// Held deliveries: under the spill policy, the excess of an endpoint that
// holds more than its share of the queues first waits in memory without
// its payload, as a heldRef of about a hundred bytes, instead of being
// written as a pending row at once. Its outbox row holds the payload, and
// the filler (holdLoop) reads payloads back in batches, by primary key,
// when the endpoint's queue runs low. Nothing is written for a held
// delivery until its outcome, so a backlog that drains within HoldFor
// costs Postgres what a queued one does: one status row, not a pending
// row, a claim and an update.
//
// The price is the acknowledgement watermark: a held delivery has no
// durable row, so the flush LSN the relay reports waits for it, and the
// slot keeps the WAL from there. A restart re-reads that WAL and delivers
// what was held again (rows already final are skipped, as after any
// restart). Two bounds keep that price small: at most HeldEvents wait
// this way, and one that has waited HoldFor is spilled as before, so the
// watermark moves on; so does everything held for an endpoint whose
// circuit opens, or that is disabled, changed to ordered or deleted.

// heldRef is a delivery waiting in memory without its payload. Its
// endpoint is the queue it waits in.
type heldRef struct {
	eventID     [16]byte
	tenantID    string
	eventType   string
	commitLSN   cdc.LSN
	endLSN      cdc.LSN
	committedAt int64 // unix nanoseconds
	heldAt      int64 // unix nanoseconds, the relay's clock
	mark        *txnMark
	eventSeq    int32
}

// refOf is d as a heldRef, held since heldAt (unix nanoseconds).
func refOf(d *delivery, heldAt int64) heldRef {
	return heldRef{
		eventID: d.eventID, tenantID: d.tenantID, eventType: d.eventType,
		commitLSN: d.commitLSN, endLSN: d.endLSN, committedAt: d.committedAt.UnixNano(),
		heldAt: heldAt, mark: d.mark, eventSeq: d.eventSeq,
	}
}

// holdable reports whether d may wait without its payload: it is fresh
// from the WAL, so no row exists for it and its outbox row holds its
// payload, headers and traceparent.
func holdable(d *delivery) bool {
	return !d.persisted && !d.maybeDup && !d.fromLane && d.payload != nil
}

// holdLocked keeps d in q's held list if d is holdable, the bound allows
// and q's circuit is closed; it reports whether it did.
func (s *scheduler) holdLocked(q *endpointQueue, d *delivery) bool {
	if s.held >= s.maxHeld || s.evicted == nil || !holdable(d) || q.ep == nil {
		return false // (without evicted, nothing could spill what is held)
	}
	if q.breaker != nil && q.breaker.cb.State() != gobreaker.StateClosed {
		return false // not draining: spilled, the watermark can pass it
	}
	q.held.push(refOf(d, s.now().UnixNano()))
	s.held++
	s.heldTotal++
	s.holding[q] = struct{}{}
	return true
}

// unholdLocked takes q's first n held deliveries out, as deliveries
// without payload.
func (s *scheduler) unholdLocked(q *endpointQueue, n int) []*delivery {
	out := make([]*delivery, 0, n)
	for range n {
		h := q.held.pop()
		out = append(out, &delivery{
			eventID: h.eventID, endpointID: q.ep.ID, tenantID: h.tenantID, eventType: h.eventType,
			commitLSN: h.commitLSN, endLSN: h.endLSN, committedAt: time.Unix(0, h.committedAt),
			mark: h.mark, eventSeq: h.eventSeq, ep: q.ep, state: StatePending,
		})
	}
	s.held -= n
	if q.held.len() == 0 {
		delete(s.holding, q)
	}
	return out
}

// spillHeldLocked hands all of q's held deliveries to s.evicted, to be
// pending rows due at due: the loader takes them from there, and says why
// if the endpoint no longer takes them.
func (s *scheduler) spillHeldLocked(q *endpointQueue, due time.Time) {
	if q.held.len() == 0 {
		return
	}
	s.evicted(s.unholdLocked(q, q.held.len()), due) // set whenever anything is held
}

// fillTargetLocked is how many deliveries q's queue is refilled to from
// its held list: its share of the queues.
func (s *scheduler) fillTargetLocked() int {
	return max(min(256, s.maxCount), s.maxCount/max(1, s.active))
}

// wantFillLocked wakes the filler when q runs low and has held deliveries.
func (s *scheduler) wantFillLocked(q *endpointQueue) {
	if q.held.len() > 0 && q.items.len()+q.filling < s.fillTargetLocked()/2 {
		select {
		case s.fillKick <- struct{}{}:
		default:
		}
	}
}

// takeHeld takes up to limit held deliveries to fetch payloads for: of
// each endpoint whose queue is below its share, enough to refill it, as
// far as the queues' bounds allow. qs[i] is the queue ds[i] came from.
func (s *scheduler) takeHeld(limit int) (ds []*delivery, qs []*endpointQueue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	target := s.fillTargetLocked()
	for q := range s.holding {
		room := min(limit-len(ds), s.maxCount-s.count-s.filling)
		if room <= 0 || s.bytes >= s.maxBytes {
			break
		}
		n := min(q.held.len(), target-q.items.len()-q.filling, room)
		if n <= 0 {
			continue
		}
		for _, d := range s.unholdLocked(q, n) {
			ds, qs = append(ds, d), append(qs, q)
		}
		q.filling += n
		s.filling += n
	}
	return ds, qs
}

// acceptFilled queues deliveries whose payloads the filler read. Those
// whose endpoint changed meanwhile (deleted, disabled, turned ordered) are
// returned, to be written as pending rows: the loader or the lane deals
// with them from there.
func (s *scheduler) acceptFilled(ds []*delivery, qs []*endpointQueue) (rows []*delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	added := false
	for i, d := range ds {
		q := qs[i]
		q.filling--
		s.filling--
		if s.endpoints[d.endpointID] != q || q.lane != nil || q.ep == nil {
			rows = append(rows, d)
			continue
		}
		if _, _, refused := q.ep.refusal(); refused {
			rows = append(rows, d)
			continue
		}
		d.ep = q.ep
		s.pushLocked(q, d)
		s.makeReadyLocked(q)
		added = true
	}
	if added && s.idle > 0 {
		s.work.Signal()
	}
	return rows
}

// untake puts deliveries taken by takeHeld back at the front of their
// held lists, in order, after the payloads could not be read.
func (s *scheduler) untake(ds []*delivery, qs []*endpointQueue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now().UnixNano()
	back := make(map[*endpointQueue][]heldRef)
	for i, d := range ds {
		q := qs[i]
		q.filling--
		s.filling--
		// They were held before what is still held: as old as its front,
		// so the oldest stay first for takeAged.
		at := now
		if q.held.len() > 0 {
			at = min(at, q.held.items[q.held.head].heldAt)
		}
		back[q] = append(back[q], refOf(d, at))
	}
	for q, refs := range back {
		rest := q.held.items[q.held.head:]
		q.held.items = append(refs, rest...)
		q.held.head = 0
		s.held += len(refs)
		s.holding[q] = struct{}{}
	}
}

// takeAged takes the held deliveries that have waited longer than
// holdFor, to be spilled.
func (s *scheduler) takeAged(holdFor time.Duration) []*delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	cutoff := s.now().Add(-holdFor).UnixNano()
	var out []*delivery
	for q := range s.holding {
		n := 0
		for n < q.held.len() && q.held.items[q.held.head+n].heldAt <= cutoff {
			n++
		}
		if n > 0 {
			out = append(out, s.unholdLocked(q, n)...)
		}
	}
	return out
}

// heldCount is the deliveries held now and ever.
func (s *scheduler) heldCount() (now, total int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held, s.heldTotal
}

// holdLoop reads the payloads of held deliveries back when their queues
// run low, and spills those held too long.
func (r *Relay) holdLoop(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if aged := r.sched.takeAged(r.cfg.HoldFor); len(aged) > 0 {
				r.log.Info("spilling deliveries held in memory too long", slog.Int("deliveries", len(aged)), slog.Duration("hold_for", r.cfg.HoldFor))
				r.writer.add(r.toPending(aged, r.now())...)
			}
		case <-r.sched.fillKick:
		}
		for ctx.Err() == nil {
			ds, qs := r.sched.takeHeld(maxFill)
			if len(ds) == 0 {
				break
			}
			if err := fetchPayloads(ctx, r.pool, ds); err != nil {
				r.sched.untake(ds, qs)
				if ctx.Err() == nil {
					r.log.Warn("reading held deliveries' payloads failed; retrying", slog.Any("error", err))
				}
				break // the ticker tries again
			}
			if rows := r.sched.acceptFilled(ds, qs); len(rows) > 0 {
				r.writer.add(r.toPending(rows, r.now())...)
			}
			if len(ds) < maxFill {
				break
			}
		}
	}
}

// maxFill is the most held deliveries one read fetches payloads for.
const maxFill = 1000

const fetchPayloadsSQL = `SELECT id, payload::text, headers::text, traceparent FROM relay.outbox WHERE id = ANY($1::uuid[])`

// fetchPayloads reads the payload, headers and traceparent of each
// delivery's outbox row. A delivery whose row is gone keeps a nil
// payload, and its attempt ends it dead, saying why.
func fetchPayloads(ctx context.Context, pool *pgxpool.Pool, ds []*delivery) error {
	byID := make(map[[16]byte][]*delivery, len(ds))
	ids := make([][16]byte, 0, len(ds))
	for _, d := range ds {
		if byID[d.eventID] == nil {
			ids = append(ids, d.eventID)
		}
		byID[d.eventID] = append(byID[d.eventID], d)
	}
	rows, err := pool.Query(ctx, fetchPayloadsSQL, ids)
	if err != nil {
		return fmt.Errorf("read held deliveries' payloads: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id [16]byte
		var payload, headers []byte
		var tp *string
		if err := rows.Scan(&id, &payload, &headers, &tp); err != nil {
			return fmt.Errorf("read held deliveries' payloads: %w", err)
		}
		for _, d := range byID[id] {
			d.payload, d.headers = payload, headers
			if tp != nil {
				d.traceparent = *tp
			}
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read held deliveries' payloads: %w", err)
	}
	return nil
}
