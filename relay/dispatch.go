package relay

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// configState is the endpoint and tenant config, owned by the dispatch
// goroutine (and by loadConfig before it starts). Changes arrive in the
// replication stream in commit order, so an event is routed with the
// config committed before it.
type configState struct {
	endpoints map[string]*Endpoint
	raw       map[string]mapRow // last full row per endpoint, for unchanged TOAST values
	byTenant  map[string][]*Endpoint
	tenants   map[string]*Tenant
}

func newConfigState() *configState {
	return &configState{
		endpoints: make(map[string]*Endpoint),
		raw:       make(map[string]mapRow),
		byTenant:  make(map[string][]*Endpoint),
		tenants:   make(map[string]*Tenant),
	}
}

func (c *configState) upsertEndpoint(row mapRow, log *slog.Logger) *Endpoint {
	ep, err := parseEndpoint(row)
	if err != nil {
		log.Warn("ignoring endpoint row", slog.Any("error", err))
		return nil
	}
	if old := c.endpoints[ep.ID]; old != nil {
		c.unindex(old)
	}
	c.endpoints[ep.ID] = ep
	c.raw[ep.ID] = row
	c.byTenant[ep.TenantID] = append(c.byTenant[ep.TenantID], ep)
	if ep.Invalid != "" {
		log.Warn("endpoint is unusable; its deliveries will be rejected", slog.String("endpoint_id", ep.ID), slog.String("reason", ep.Invalid))
	}
	return ep
}

func (c *configState) deleteEndpoint(id string) {
	if old := c.endpoints[id]; old != nil {
		c.unindex(old)
	}
	delete(c.endpoints, id)
	delete(c.raw, id)
}

func (c *configState) unindex(ep *Endpoint) {
	list := c.byTenant[ep.TenantID]
	for i, e := range list {
		if e.ID == ep.ID {
			list = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(c.byTenant, ep.TenantID)
	} else {
		c.byTenant[ep.TenantID] = list
	}
}

func (c *configState) upsertTenant(row mapRow) *Tenant {
	t, err := parseTenant(row)
	if err != nil {
		return nil
	}
	c.tenants[t.ID] = t
	return t
}

// tupleRow adapts a decoded tuple to row, taking unchanged TOAST values
// from the previous version of the row.
func tupleRow(rel *cdc.Relation, vals []cdc.Value, prev mapRow) mapRow {
	m := make(mapRow, len(rel.Columns))
	for i, col := range rel.Columns {
		if i >= len(vals) {
			break
		}
		switch vals[i].Kind {
		case 'n':
			m[col.Name] = nil
		case 'u':
			if prev != nil {
				m[col.Name] = prev[col.Name]
			}
		default:
			s := string(vals[i].Data)
			m[col.Name] = &s
		}
	}
	return m
}

// outboxCols caches where the outbox columns sit in a relation.
type outboxCols struct {
	rel                                                         *cdc.Relation
	id, tenant, typ, payload, endpoint, headers, trace, created int
}

func (o *outboxCols) bind(rel *cdc.Relation) {
	if o.rel == rel {
		return
	}
	o.rel = rel
	o.id, o.tenant, o.typ = rel.ColumnIndex("id"), rel.ColumnIndex("tenant_id"), rel.ColumnIndex("event_type")
	o.payload, o.endpoint, o.headers = rel.ColumnIndex("payload"), rel.ColumnIndex("endpoint_id"), rel.ColumnIndex("headers")
	o.trace, o.created = rel.ColumnIndex("traceparent"), rel.ColumnIndex("created_at")
}

func colBytes(vals []cdc.Value, i int) []byte {
	if i < 0 || i >= len(vals) || vals[i].Kind != 't' {
		return nil
	}
	return vals[i].Data
}

// dispatch turns batches of transactions into deliveries: config changes
// are applied in order, outbox rows are routed, every transaction with
// deliveries is registered with the watermark, and deliveries are queued
// (or spilled, or waited for, by the overflow policy).
func (r *Relay) dispatch(ctx context.Context, in <-chan cdc.Batch) error {
	var cols outboxCols
	var queue, final []*delivery
	lanesOpen := false
	// A transaction handed over in parts (cdc.Txn.More): its CommitLSN,
	// and the position of its next outbox row.
	var partLSN cdc.LSN
	var partSeq int32
	for {
		var b cdc.Batch
		select {
		case <-ctx.Done():
			return nil
		case b = <-in:
		}
		if r.histq.waitBehind(ctx, r.cfg.historyLag) != nil {
			return nil
		}
		queue, final = queue[:0], final[:0]
		var recheck []*delivery
		var histMarks []*txnMark // transactions whose endpoint versions are still to be recorded
		lanes := false           // a delivery for an ordered endpoint, or a change to one, in this batch
		for ti := range b.Txns {
			txn := &b.Txns[ti]
			startQ, startF, startH := len(queue), len(final), len(r.history.entries)
			var seq int32 // the outbox row's position in the transaction
			if partLSN != 0 && txn.CommitLSN == partLSN {
				seq = partSeq // the rest of a transaction that came in parts
			}
			for ci := range txn.Changes {
				ch := &txn.Changes[ci]
				rel := ch.Rel
				if rel.Namespace != "relay" {
					continue
				}
				switch rel.Name {
				case "outbox":
					if ch.Op != cdc.Insert {
						continue
					}
					cols.bind(rel)
					r.metrics.eventsReceived.Inc()
					var ordered bool
					queue, final, ordered = r.route(txn, ch.New, &cols, seq, queue, final)
					lanes = lanes || ordered
					seq++
				case "endpoints":
					if r.applyEndpointChange(ch, &final, txn) {
						lanes = true
					}
				case "tenants":
					if ch.Op == cdc.Delete {
						continue
					}
					r.installTenant(r.config.upsertTenant(tupleRow(rel, ch.New, nil)))
				}
			}
			if txn.More {
				partLSN, partSeq = txn.CommitLSN, seq
			} else {
				partLSN, partSeq = 0, 0
			}
			// Counted over every part of a transaction, said after the last.
			if more := r.changeLog.more(txn); more > 0 {
				r.log.Info("more endpoint config changes in this transaction, logged at debug level",
					slog.Int("endpoints", more), slog.String("commit_lsn", txn.CommitLSN.String()))
			}
			n := len(queue) - startQ + len(final) - startF
			changed := len(r.history.entries) > startH
			if changed {
				n++ // the history write (history.go, invariant 1)
			}
			if n == 0 {
				continue
			}
			// A part's EndLSN is zero: its mark holds the watermark back
			// until its rows are durable, and never moves it.
			mark := r.wm.add(txn.EndLSN, n)
			if changed {
				histMarks = append(histMarks, mark)
			}
			for _, d := range queue[startQ:] {
				d.mark = mark
			}
			for _, d := range final[startF:] {
				d.mark = mark
			}
			if recordLSN(txn) <= r.recorded {
				recheck = append(recheck, queue[startQ:]...)
				recheck = append(recheck, final[startF:]...)
			}
		}
		if len(histMarks) > 0 {
			r.histq.add(r.history.take(), histMarks)
		}
		if len(recheck) > 0 {
			var err error
			if queue, final, err = r.dropRecorded(ctx, recheck, queue, final); err != nil {
				return err
			}
		}
		var laneRows []*delivery
		if lanes && len(queue) > 0 {
			// Ordered endpoints' deliveries become pending rows, written in
			// commit order with this batch (lane.go, invariant 3). Decided
			// here, with the config as of the end of the batch, so one
			// turned ordered within the batch is covered too.
			queue, laneRows = r.sched.splitLanes(queue, r.now())
			final = append(final, laneRows...)
		}
		if len(final) > 0 {
			r.writer.add(final...)
		}
		if len(laneRows) > 0 {
			r.sched.kickLanes()
		}
		if len(queue) > 0 {
			now := time.Now()
			for _, d := range queue {
				r.recent.add(d.endpointID, now)
			}
			r.enqueue(ctx, queue)
		}
		r.wm.advance(b.Position)
		if !lanesOpen && b.Position >= r.recorded {
			// Every event recorded before a restart has been routed again:
			// ordered endpoints may read their rows (lane.go, invariant 7).
			r.sched.openLanes()
			lanesOpen = true
		}
	}
}

// recordLSN is the end a delivery of txn records for its transaction
// (relay_state.recorded_lsn follows it, and a restart looks up the rows of
// events at or below it): the EndLSN, or for a part of a larger
// transaction (not ended yet) its CommitLSN, which lies past the end of
// every earlier transaction and before its own.
func recordLSN(txn *cdc.Txn) cdc.LSN {
	if txn.More {
		return txn.CommitLSN
	}
	return txn.EndLSN
}

// route builds the deliveries of one outbox row: to the named endpoint, or
// to every enabled endpoint of the tenant that subscribes to the type.
// Deliveries that cannot be attempted go to final with their reason.
// ordered reports a delivery for an ordered endpoint among them.
func (r *Relay) route(txn *cdc.Txn, vals []cdc.Value, cols *outboxCols, seq int32, queue, final []*delivery) (_, _ []*delivery, ordered bool) {
	id, ok := parseUUID(colBytes(vals, cols.id))
	if !ok {
		r.log.Error("outbox row without a valid id; skipped", slog.String("commit_lsn", txn.CommitLSN.String()))
		return queue, final, false
	}
	base := delivery{
		eventID:     id,
		tenantID:    string(colBytes(vals, cols.tenant)),
		eventType:   string(colBytes(vals, cols.typ)),
		payload:     colBytes(vals, cols.payload),
		headers:     colBytes(vals, cols.headers),
		traceparent: string(colBytes(vals, cols.trace)),
		commitLSN:   txn.CommitLSN,
		eventSeq:    seq,
		endLSN:      recordLSN(txn),
		committedAt: txn.CommitTime,
		state:       StatePending,
	}
	tooBig := len(base.payload) > r.cfg.MaxPayloadBytes
	reject := func(d *delivery, state State, reason string) {
		d.state = state
		d.errText = reason
		d.completed = r.now()
		final = append(final, d)
	}
	add := func(ep *Endpoint) {
		d := new(delivery)
		*d = base
		d.endpointID = ep.ID
		d.ep = ep
		if tooBig {
			reject(d, StateRejected, tooBigReason(len(base.payload), r.cfg.MaxPayloadBytes))
		} else if state, reason, refused := ep.refusal(); refused {
			reject(d, state, reason)
		} else {
			queue = append(queue, d)
			ordered = ordered || ep.Ordered
		}
	}
	if epID := colBytes(vals, cols.endpoint); epID != nil {
		ep := r.config.endpoints[string(epID)]
		if ep == nil || ep.TenantID != base.tenantID {
			d := new(delivery)
			*d = base
			d.endpointID = string(epID)
			reason := "unknown endpoint " + d.endpointID
			if ep != nil {
				reason = "endpoint " + d.endpointID + " belongs to another tenant"
			}
			reject(d, StateRejected, reason)
			return queue, final, false
		}
		add(ep)
		return queue, final, ordered
	}
	routed := false
	for _, ep := range r.config.byTenant[base.tenantID] {
		if ep.Enabled && ep.Subscribes(base.eventType) {
			add(ep)
			routed = true
		}
	}
	if !routed {
		d := new(delivery)
		*d = base
		reject(d, StateUnrouted, fmt.Sprintf("no enabled endpoint of tenant %q subscribes to %q", base.tenantID, base.eventType))
	}
	return queue, final, ordered
}

// tooBigReason is the error of a delivery whose payload of n bytes is over
// limit.
func tooBigReason(n, limit int) string {
	return fmt.Sprintf("payload is %d bytes, over the limit of %d (max payload bytes)", n, limit)
}

// applyEndpointChange applies one change to relay.endpoints. It reports
// whether an ordered endpoint was involved (before or after the change).
func (r *Relay) applyEndpointChange(ch *cdc.Change, final *[]*delivery, txn *cdc.Txn) (ordered bool) {
	rel := ch.Rel
	if ch.Op == cdc.Delete {
		row := tupleRow(rel, ch.Old, nil)
		idp := row["id"]
		if idp == nil {
			return false
		}
		if old := r.config.endpoints[*idp]; old != nil {
			ordered = old.Ordered
		}
		r.history.add(historyEntry{id: *idp, lsn: txn.CommitLSN, op: "delete"})
		r.config.deleteEndpoint(*idp)
		r.endpointsChanged()
		// Deliveries already queued for it end here, with the reason.
		for _, d := range r.sched.removeEndpoint(*idp) {
			d.state, d.errText, d.completed = StateRejected, "endpoint "+*idp+" was deleted", r.now()
			r.writer.add(d)
		}
		return ordered
	}
	var prev mapRow
	if ch.Op == cdc.Update {
		if idx := rel.ColumnIndex("id"); idx >= 0 && idx < len(ch.New) {
			prev = r.config.raw[string(ch.New[idx].Data)]
			if old := r.config.endpoints[string(ch.New[idx].Data)]; old != nil {
				ordered = old.Ordered
			}
		}
	}
	row := tupleRow(rel, ch.New, prev)
	if id, ok := row.text("id"); ok {
		op := "update"
		if ch.Op == cdc.Insert {
			op = "insert"
		}
		r.history.add(historyEntry{id: id, lsn: txn.CommitLSN, op: op, row: row})
	}
	ep := r.config.upsertEndpoint(row, r.log)
	r.endpointsChanged()
	if ep != nil {
		r.installEndpoint(ep)
		r.log.Log(context.Background(), r.changeLog.level(txn.CommitLSN), "endpoint config changed", slog.String("endpoint_id", ep.ID),
			slog.Bool("enabled", ep.Enabled), slog.Bool("ordered", ep.Ordered), slog.String("commit_lsn", txn.CommitLSN.String()))
		ordered = ordered || ep.Ordered
	}
	return ordered
}

// changeLog keeps a transaction that changes many endpoints (a bulk
// import, a migration, a first start replaying their creation) from
// writing a line per endpoint at info level: the first changeLogLimit
// are logged there, the rest at debug, and one line says how many more.
// Dispatch goroutine only.
type changeLog struct {
	txn cdc.LSN // commit LSN of the transaction being counted
	n   int     // its endpoint changes logged so far
}

const changeLogLimit = 20

// level counts one change of the transaction at commit and returns the
// level to log it at.
func (c *changeLog) level(commit cdc.LSN) slog.Level {
	if c.txn != commit {
		c.txn, c.n = commit, 0
	}
	c.n++
	if c.n > changeLogLimit {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// more returns how many of txn's changes went to debug level, once,
// after its last change (in its last part, if it came in parts).
func (c *changeLog) more(txn *cdc.Txn) int {
	if txn.More || c.txn != txn.CommitLSN || c.n <= changeLogLimit {
		return 0
	}
	more := c.n - changeLogLimit
	c.n = 0
	return more
}

// dropRecorded removes deliveries whose row already exists: they were
// recorded before a restart, and their final state (or their retry row)
// stands.
func (r *Relay) dropRecorded(ctx context.Context, ds, queue, final []*delivery) ([]*delivery, []*delivery, error) {
	ids := make([][16]byte, 0, len(ds))
	for _, d := range ds {
		ids = append(ids, d.eventID)
	}
	var existing map[pairKey]bool
	if err := r.retrySQL(ctx, "restart lookup", func() (err error) {
		existing, err = existingRows(ctx, r.pool, ids)
		return err
	}); err != nil {
		return queue, final, err
	}
	// The recorded routing stands, even if the config changed since: an
	// event recorded as unrouted is not routed now, and an event with a
	// recorded delivery gets no unrouted row.
	routed := make(map[[16]byte]bool)
	for k := range existing {
		if k.endpoint != "" {
			routed[k.event] = true
		}
	}
	keep := func(list []*delivery) []*delivery {
		out := list[:0]
		for _, d := range list {
			if d.endLSN <= r.recorded {
				d.maybeDup = true
				if existing[pairKey{d.eventID, d.endpointID}] || existing[pairKey{d.eventID, ""}] ||
					(d.endpointID == "" && routed[d.eventID]) {
					d.mark.done(1)
					r.metrics.restartSkipped.Inc()
					continue
				}
			}
			out = append(out, d)
		}
		return out
	}
	return keep(queue), keep(final), nil
}

// recentSet counts the endpoints that had deliveries routed lately.
type recentSet struct {
	seen   map[string]time.Time
	pruned time.Time
}

// recentWindow is how long an endpoint counts as busy after its last
// routed delivery.
const recentWindow = 5 * time.Second

func (rs *recentSet) add(id string, now time.Time) {
	if rs.seen == nil {
		rs.seen = make(map[string]time.Time)
	}
	rs.seen[id] = now
}

func (rs *recentSet) count(now time.Time) int {
	if now.Sub(rs.pruned) > recentWindow/5 {
		for id, t := range rs.seen {
			if now.Sub(t) > recentWindow {
				delete(rs.seen, id)
			}
		}
		rs.pruned = now
	}
	return len(rs.seen)
}

// spillAfter is how long a full queue must stay full before deliveries
// are spilled: a backlog that workers are draining waits instead (the WAL
// keeps it), which costs Postgres far less than writing it twice.
const spillAfter = time.Second

// enqueue hands deliveries to the scheduler under the overflow policy.
func (r *Relay) enqueue(ctx context.Context, ds []*delivery) {
	var fullSince time.Time
	for len(ds) > 0 {
		ds = r.sched.push(ds, true)
		if len(ds) == 0 || ctx.Err() != nil {
			return
		}
		// Full. Meanwhile the stream keeps sending status updates and
		// the WAL waits in the slot.
		if fullSince.IsZero() {
			fullSince = time.Now()
		}
		if r.cfg.Overflow == OverflowBlock {
			r.sched.waitRoom(1, ctx.Done(), time.Second)
			continue
		}
		// With several endpoints busy lately, one that holds far more than
		// its share of the queue must not keep the others' events waiting
		// in the WAL behind its own: its excess spills now. A backlog that
		// the workers are draining (one endpoint, or many evenly) waits
		// instead, which costs nothing; if the queue stays full for
		// spillAfter, whatever is over its share spills. A delivery of
		// an endpoint under its share never waits for another's backlog
		// (one read more than recentWindow ago no longer counts as busy,
		// but still fills the queues).
		busy := r.recent.count(time.Now())
		left := spillAfter - time.Since(fullSince)
		if busy <= 1 && left > 0 && !r.sched.underShare(ds) {
			r.sched.waitRoom(1, ctx.Done(), left)
			continue
		}
		spill, wait := r.sched.pushShare(ds, busy, left <= 0)
		if len(spill) > 0 {
			r.writer.add(r.toPending(spill, r.now())...)
		}
		if ds = wait; len(ds) > 0 {
			r.sched.waitRoom(1, ctx.Done(), max(10*time.Millisecond, left))
		}
	}
}

// toPending turns deliveries that leave memory into pending rows due at
// due. A delivery fresh from the WAL leaves its payload, headers and
// traceparent behind: its outbox row holds them, the loader reads them
// back from there, and the cleanup keeps an outbox row while a pending row
// refers to it. So a spill writes a small row, and what waits in the
// writer's buffer holds no payload. A delivery that already has a row
// (loaded, or re-streamed after a restart), or whose outbox row may be
// near its retention, keeps its own copy.
func (r *Relay) toPending(ds []*delivery, due time.Time) []*delivery {
	old := r.now().Add(-r.cfg.OutboxRetention / 2)
	for _, d := range ds {
		d.state = StatePending
		d.nextAttempt = due
		if !d.persisted && !d.maybeDup && d.committedAt.After(old) {
			d.payload, d.headers, d.traceparent = nil, nil, ""
		} else {
			d.payload = append([]byte(nil), d.payload...)
		}
	}
	r.metrics.spilled.Add(float64(len(ds)))
	r.spilled.Store(true)
	return ds
}

// evict records deliveries of a long-parked endpoint as pending rows due
// at until, freeing memory and letting the watermark pass them. The loader
// brings them back when due.
func (r *Relay) evict(ds []*delivery, until time.Time) {
	r.writer.addNoWait(r.toPending(ds, until)...) // called under the scheduler's lock
}

// loadLoop claims due retries and spilled deliveries from
// relay.deliveries when the queues have room.
func (r *Relay) loadLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			// A claim that lapsed (its relay held the row past the
			// lease) makes the row claimable again, as it always was;
			// claims only read unclaimed rows, so lapsed ones are
			// released here, once a tick.
			if n, err := releaseExpired(ctx, r.pool); err != nil {
				if ctx.Err() == nil {
					r.log.Warn("releasing lapsed claims failed", slog.Any("error", err))
				}
			} else if n > 0 {
				r.log.Info("released lapsed claims", slog.Int64("rows", n))
			}
		case <-r.sched.room:
			if !r.spilled.Load() {
				continue
			}
		}
		probed := false
		for ctx.Err() == nil {
			room := r.sched.space()
			if room < min(100, r.cfg.QueueEvents/4) {
				break
			}
			excluded, probes := r.sched.loadExcluded(r.now())
			if len(probes) > 0 && !probed {
				// One row each for the open circuits whose cooldown is
				// over: their probes. The rest of their rows stay put.
				probed = true
				ds, err := claimProbes(ctx, r.pool, probes[:min(len(probes), maxProbesPerLoad)], r.cfg.ClaimLease)
				if err != nil {
					if ctx.Err() == nil {
						r.log.Warn("claiming probes failed", slog.Any("error", err))
					}
					break
				}
				r.acceptLoaded(ds)
			}
			stop := stillRunning(r.log, r.cfg.slowSQL, "claiming due deliveries still running; retries and spilled deliveries wait for it")
			ds, err := claimDue(ctx, r.pool, min(room, 1000), r.cfg.ClaimLease, append(excluded, probes...))
			stop()
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("claiming due deliveries failed", slog.Any("error", err))
				}
				break
			}
			if len(ds) == 0 {
				r.spilled.Store(false)
				break
			}
			r.acceptLoaded(ds)
			if len(ds) < min(room, 1000) {
				break
			}
		}
	}
}

// maxProbesPerLoad bounds the probes one loader pass claims (one row per
// endpoint whose circuit awaits a probe); the next pass takes the rest.
const maxProbesPerLoad = 500

// acceptLoaded queues claimed rows for delivery, or ends those whose
// endpoint is gone or refuses them.
func (r *Relay) acceptLoaded(ds []*delivery) {
	if len(ds) == 0 {
		return
	}
	r.metrics.loaded.Add(float64(len(ds)))
	var queue []*delivery
	for _, d := range ds {
		d.state = StatePending
		ep, ordered := r.sched.endpointForLoad(d.endpointID)
		if ordered {
			continue // turned ordered since the claim: the row is its lane's
		}
		if ep == nil {
			d.state, d.errText = StateRejected, "unknown endpoint "+d.endpointID
		} else if state, reason, refused := ep.refusal(); refused {
			d.state, d.errText = state, reason
		} else {
			d.ep = ep
			queue = append(queue, d)
			continue
		}
		d.completed = r.now()
		r.writer.add(d)
	}
	r.sched.push(queue, false)
}

// cleanupLoop removes old outbox rows and old final delivery rows in
// small batches, so no statement holds locks for long.
func (r *Relay) cleanupLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.CleanupInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.cleanup(ctx)
	}
}

func (r *Relay) cleanup(ctx context.Context) {
	r.cleanupOlder(ctx, r.cfg.OutboxRetention, r.cfg.DeliveryRetention, r.cfg.DeadLetterRetention)
	if _, err := r.pool.Exec(ctx, pruneHistorySQL); err != nil && ctx.Err() == nil {
		r.log.Warn("cleanup failed", slog.String("table", "endpoint history"), slog.Any("error", err))
	}
}

// cleanupOlder removes outbox rows older than outbox, succeeded and
// unrouted deliveries and attempt rows older than deliveries, and dead
// letters older than deadLetters.
func (r *Relay) cleanupOlder(ctx context.Context, outbox, deliveries, deadLetters time.Duration) {
	const batch = 5000
	steps := []struct {
		what, sql string
		keep      time.Duration
	}{
		// A pending row spilled without its payload reads it from its
		// outbox row: that row stays until the delivery is done.
		{"outbox", `DELETE FROM relay.outbox WHERE id IN (
SELECT o.id FROM relay.outbox o WHERE o.created_at < now() - $1::interval
AND NOT EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.event_id = o.id AND d.payload IS NULL AND d.state IN ('pending', 'retrying'))
ORDER BY o.created_at LIMIT 5000)`, outbox},
		{"deliveries", `DELETE FROM relay.deliveries WHERE (event_id, endpoint_id) IN (
SELECT event_id, endpoint_id FROM relay.deliveries WHERE completed_at < now() - $1::interval
AND state IN ('succeeded', 'unrouted') LIMIT 5000)`, deliveries},
		{"dead letters", `DELETE FROM relay.deliveries WHERE (event_id, endpoint_id) IN (
SELECT event_id, endpoint_id FROM relay.deliveries WHERE completed_at < now() - $1::interval
AND state IN ('dead', 'failed', 'rejected') LIMIT 5000)`, deadLetters},
		{"attempts", `DELETE FROM relay.attempts WHERE ctid IN (
SELECT ctid FROM relay.attempts WHERE attempted_at < now() - $1::interval LIMIT 5000)`, deliveries},
	}
	for _, s := range steps {
		for ctx.Err() == nil {
			tag, err := r.pool.Exec(ctx, s.sql, s.keep.String())
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("cleanup failed", slog.String("table", s.what), slog.Any("error", err))
				}
				break
			}
			if tag.RowsAffected() < batch {
				break
			}
		}
	}
}
