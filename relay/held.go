package relay

import "time"

// The bulk loader reads due rows back without claiming them (loadDue):
// a claim is an UPDATE, a new row version with its index entries, for
// every row loaded, and on a backlog that is spilled and loaded back it
// was half of what Postgres spent per delivery. Only the active relay
// loads, and at startup it clears every claim anyway, so a claim kept
// rows from no one but this process. The held set does that in memory:
// a row read back stays in it until the next row of that delivery is
// durable (its outcome, or pending again), and the loader skips held rows
// when a pass finds them again. An entry older than the claim lease no
// longer counts, as a lapsed claim did not.
//
// A query's snapshot is taken when it starts. A row whose outcome commits
// while the query runs can come back in its old version, due, and its
// entry may already be gone: so the rows released during a pass are kept
// in released (cleared as the next pass begins), and a row in it is
// skipped too. A claim's UPDATE did that check itself, on the row's
// newest version.

// holdLoaded drops from ds the rows already held (loaded and not yet
// written) and holds the others. lease is how long an entry counts.
func (r *Relay) holdLoaded(ds []*delivery, now time.Time, lease time.Duration) []*delivery {
	if len(ds) == 0 {
		return ds
	}
	out := ds[:0]
	r.heldMu.Lock()
	if r.held == nil {
		r.held = make(map[pairKey]time.Time)
	}
	for _, d := range ds {
		k := pairKey{d.eventID, d.endpointID}
		if at, ok := r.held[k]; ok && now.Sub(at) < lease {
			continue
		}
		if _, stale := r.released[k]; stale {
			continue
		}
		r.held[k] = now
		d.held = true
		out = append(out, d)
	}
	r.heldMu.Unlock()
	clear(ds[len(out):])
	return out
}

// dropHeld drops from ds the rows held: a claim (a probe's) may return a
// row the loader read back and that waits for its outcome to be written.
func (r *Relay) dropHeld(ds []*delivery, now time.Time, lease time.Duration) []*delivery {
	if len(ds) == 0 {
		return ds
	}
	out := ds[:0]
	r.heldMu.Lock()
	for _, d := range ds {
		k := pairKey{d.eventID, d.endpointID}
		if at, ok := r.held[k]; ok && now.Sub(at) < lease {
			continue
		}
		if _, stale := r.released[k]; stale {
			continue
		}
		out = append(out, d)
	}
	r.heldMu.Unlock()
	clear(ds[len(out):])
	return out
}

// unhold releases d's entry: its next row is durable, or it left memory
// without one (the endpoint turned ordered: its lane loads it).
func (r *Relay) unhold(ds ...*delivery) {
	locked := false
	for _, d := range ds {
		if !d.held {
			continue
		}
		if !locked {
			r.heldMu.Lock()
			locked = true
		}
		k := pairKey{d.eventID, d.endpointID}
		delete(r.held, k)
		if r.released == nil {
			r.released = make(map[pairKey]struct{})
		}
		r.released[k] = struct{}{}
		d.held = false
	}
	if locked {
		r.heldMu.Unlock()
	}
}

// beginLoad is called before each loader query: rows released from now
// on may come back in the query's result in an older version.
func (r *Relay) beginLoad() {
	r.heldMu.Lock()
	clear(r.released)
	r.heldMu.Unlock()
}

// sweepHeld forgets entries older than lease, so a delivery that left
// memory without a row (a bug) is loaded again, as a lapsed claim was.
func (r *Relay) sweepHeld(now time.Time, lease time.Duration) int {
	r.heldMu.Lock()
	defer r.heldMu.Unlock()
	n := 0
	for k, at := range r.held {
		if now.Sub(at) >= lease {
			delete(r.held, k)
			n++
		}
	}
	return n
}

// heldCount is the number of held rows.
func (r *Relay) heldCount() int {
	r.heldMu.Lock()
	defer r.heldMu.Unlock()
	return len(r.held)
}

// rowsWritten is the writer's callback after each durable batch.
func (r *Relay) rowsWritten(rows []*delivery) {
	r.metrics.written(rows)
	r.unhold(rows...)
}
