package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// Endpoint history (relay.endpoint_history) lets a restarted relay route
// the events it replays with the config as of their commit, not as of the
// restart. The stream applies config changes in commit order, so only the
// starting state matters: the config as of the slot's confirmed position.
//
// Invariants:
//  1. Every endpoint change the stream delivers is written to the history,
//     at its transaction's commit LSN, before the watermark may pass that
//     transaction (dispatch holds a mark for it until the write returns).
//     So every change at or below a slot's confirmed position is recorded.
//  2. At startup, an endpoint's state at the confirmed position S is its
//     newest version at or below S. With none, and the oldest version
//     above S an insert, it did not exist at S. With no version at all it
//     is taken as it is now, and recorded so ('snapshot' at S): an
//     endpoint the relay has never seen (a first start, an upgrade, a
//     change made while an older binary ran) keeps the old behaviour.
//  3. Pruning keeps, per endpoint, the newest version at or below the
//     oldest confirmed position of this database's logical slots, and what
//     comes after; an endpoint deleted at or below it goes entirely.

// historyEntry is one endpoint version to record.
type historyEntry struct {
	id  string
	lsn cdc.LSN
	op  string // insert, update, delete, snapshot
	row mapRow // nil for delete
}

// historyBatch collects a batch's entries, one per (endpoint, commit LSN):
// a transaction that changes an endpoint twice leaves its last version.
type historyBatch struct {
	entries []historyEntry
	at      map[historyKey]int
}

type historyKey struct {
	id  string
	lsn cdc.LSN
}

func (h *historyBatch) add(e historyEntry) {
	if h.at == nil {
		h.at = make(map[historyKey]int)
	}
	k := historyKey{e.id, e.lsn}
	if i, ok := h.at[k]; ok {
		switch prev := h.entries[i].op; {
		case prev == "insert" && e.op == "update":
			e.op = "insert" // created in this transaction: it did not exist before it
		case prev == "delete" && e.op == "insert":
			e.op = "update" // deleted and created again: it existed before
		}
		h.entries[i] = e
		return
	}
	h.at[k] = len(h.entries)
	h.entries = append(h.entries, e)
}

const writeHistorySQL = `INSERT INTO relay.endpoint_history (endpoint_id, commit_lsn, op, config)
SELECT e, pg_lsn '0/0' + l, o, c::jsonb FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[]) AS t(e, l, o, c)
ON CONFLICT (endpoint_id, commit_lsn) DO UPDATE SET op = EXCLUDED.op, config = EXCLUDED.config, recorded_at = now()`

// rowJSON is a row as relay.endpoint_history's config holds it, and as
// parseRowJSON reads it back.
func rowJSON(row mapRow) (string, error) {
	b, err := json.Marshal(row)
	return string(b), err
}

// writeHistory records entries in one statement.
func writeHistory(ctx context.Context, pool *pgxpool.Pool, entries []historyEntry) error {
	ids := make([]string, len(entries))
	lsns := make([]int64, len(entries))
	ops := make([]string, len(entries))
	rows := make([]*string, len(entries))
	for i, e := range entries {
		ids[i], lsns[i], ops[i] = e.id, int64(e.lsn), e.op
		if e.row != nil {
			s, err := rowJSON(e.row)
			if err != nil {
				return fmt.Errorf("encode endpoint %s: %w", e.id, err)
			}
			rows[i] = &s
		}
	}
	if _, err := pool.Exec(ctx, writeHistorySQL, ids, lsns, ops, rows); err != nil {
		return fmt.Errorf("record endpoint history: %w", err)
	}
	return nil
}

// take hands over the batch's entries and starts an empty one.
func (h *historyBatch) take() []historyEntry {
	e := h.entries
	h.entries = nil
	clear(h.at)
	return e
}

// historyQueue carries endpoint versions from the dispatcher (and the
// startup snapshot) to historyLoop, which records them off the
// dispatcher's path: deliveries routed with a new version go on while it
// is written, and the watermark waits for the write through the marks
// (invariant 1). The dispatcher runs at most historyLag ahead of an
// unwritten version (waitBehind): every transaction routed meanwhile
// keeps a mark in the watermark, so a write that hangs must stop the
// stream, as a synchronous one did, or memory would grow without bound.
type historyQueue struct {
	mu      sync.Mutex
	jobs    []historyJob  // queued, not yet taken by historyLoop
	oldest  time.Time     // when the oldest job not yet written was queued; zero: none
	written chan struct{} // closed, and replaced, whenever every queued job is written
	kick    chan struct{} // capacity 1
}

// historyJob is versions to record and the marks to complete, once each,
// when they are.
type historyJob struct {
	entries []historyEntry
	marks   []*txnMark
	queued  time.Time
}

func newHistoryQueue() *historyQueue {
	return &historyQueue{written: make(chan struct{}), kick: make(chan struct{}, 1)}
}

func (q *historyQueue) add(entries []historyEntry, marks []*txnMark) {
	now := time.Now()
	q.mu.Lock()
	if q.oldest.IsZero() {
		q.oldest = now
	}
	q.jobs = append(q.jobs, historyJob{entries, marks, now})
	q.mu.Unlock()
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

func (q *historyQueue) take() []historyJob {
	q.mu.Lock()
	defer q.mu.Unlock()
	jobs := q.jobs
	q.jobs = nil
	return jobs
}

// wrote records that the jobs taken last are written.
func (q *historyQueue) wrote() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.jobs) > 0 {
		q.oldest = q.jobs[0].queued
		return
	}
	q.oldest = time.Time{}
	close(q.written)
	q.written = make(chan struct{})
}

// waitBehind returns once no job has waited longer than lag to be
// written, or when ctx ends.
func (q *historyQueue) waitBehind(ctx context.Context, lag time.Duration) error {
	q.mu.Lock()
	if q.oldest.IsZero() || time.Since(q.oldest) < lag {
		q.mu.Unlock()
		return nil
	}
	written := q.written
	q.mu.Unlock()
	select {
	case <-written:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// mergeHistory joins the jobs' entries, one per (endpoint, commit LSN),
// as historyBatch merges a transaction's: one statement may not write a
// row twice.
func mergeHistory(jobs []historyJob) []historyEntry {
	var merged historyBatch
	for _, j := range jobs {
		for _, e := range j.entries {
			merged.add(e)
		}
	}
	return merged.entries
}

// historyLag is how far the dispatcher may run ahead of an unwritten
// endpoint version (historyQueue).
const historyLag = 2 * time.Second

// historyChunk bounds the rows of one history statement.
const historyChunk = 5000

// historyLoop records queued versions until ctx ends, all that waits in
// as few statements as historyChunk allows, then completes their marks.
// Versions queued twice for one (endpoint, commit), from a transaction
// the stream sent again after a reconnect, are written once. When ctx
// ends first, the marks stay
// pending: the slot is never acknowledged past an unrecorded version.
func (r *Relay) historyLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.histq.kick:
		}
		jobs := r.histq.take()
		for entries := mergeHistory(jobs); len(entries) > 0; {
			n := min(len(entries), historyChunk)
			err := r.retrySQL(ctx, "recording endpoint config history", func() error {
				return writeHistory(ctx, r.pool, entries[:n])
			})
			if err != nil {
				return
			}
			entries = entries[n:]
		}
		for _, j := range jobs {
			for _, m := range j.marks {
				m.done(1)
			}
		}
		r.histq.wrote()
	}
}

// slowSQL: see Config.slowSQL.
const slowSQL = 10 * time.Second

// stillRunning logs msg at warn level, with attrs and how long it has run,
// every `every` until stop is called: a statement that hangs (behind a
// lock, on a server that stopped answering) says so while it hangs, not
// only once it returns. every 0 logs nothing.
func stillRunning(log *slog.Logger, every time.Duration, msg string, attrs ...any) (stop func()) {
	if every <= 0 {
		return func() {}
	}
	start := time.Now()
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	mu.Lock()
	t = time.AfterFunc(every, func() {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		log.Warn(msg, append(attrs[:len(attrs):len(attrs)], slog.Duration("running", time.Since(start).Round(time.Millisecond)))...)
		t.Reset(every)
	})
	mu.Unlock()
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
	}
}

// retrySQL runs f until it succeeds or ctx ends, logging each failure
// ("<what> failed; retrying") and backing off from 100 ms to 5 s, and
// saying so while an attempt runs past slowSQL: for the dispatcher's
// statements, which must happen before the stream may go on.
func (r *Relay) retrySQL(ctx context.Context, what string, f func() error) error {
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 5*time.Second) {
		stop := stillRunning(r.log, r.cfg.slowSQL, what+" still running; the stream waits for it")
		err := f()
		stop()
		if err == nil {
			return nil
		}
		r.log.Warn(what+" failed; retrying", slog.Any("error", err))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
}

// endpointsAt returns the endpoint rows as of LSN at (invariant 2), given
// the rows as they are now, and the snapshot entries to record for those
// with no history. changed counts the endpoints with a version above at:
// those whose config the replay changes again.
func endpointsAt(ctx context.Context, pool *pgxpool.Pool, at cdc.LSN, current []mapRow) (rows []mapRow, snapshot []historyEntry, changed int, err error) {
	type version struct {
		op  string
		row mapRow
	}
	before := map[string]version{} // newest version at or below at
	after := map[string]string{}   // op of the oldest version above at
	// Per endpoint: the newest version at or below at, and the oldest above.
	q, err := pool.Query(ctx, `SELECT DISTINCT ON (endpoint_id, commit_lsn <= $1::pg_lsn) endpoint_id, commit_lsn <= $1::pg_lsn, op, config::text
FROM relay.endpoint_history
ORDER BY endpoint_id, commit_lsn <= $1::pg_lsn,
    CASE WHEN commit_lsn <= $1::pg_lsn THEN $1::pg_lsn - commit_lsn ELSE commit_lsn - $1::pg_lsn END`, at.String())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("read endpoint history: %w", err)
	}
	for q.Next() {
		var id, op string
		var atOrBefore bool
		var cfg *string
		if err := q.Scan(&id, &atOrBefore, &op, &cfg); err != nil {
			q.Close()
			return nil, nil, 0, fmt.Errorf("read endpoint history: %w", err)
		}
		if !atOrBefore {
			after[id] = op
			continue
		}
		v := version{op: op}
		if cfg != nil {
			row, ok := parseRowJSON(*cfg)
			if !ok {
				if err := json.Unmarshal([]byte(*cfg), &row); err != nil {
					q.Close()
					return nil, nil, 0, fmt.Errorf("endpoint history of %s: %w", id, err)
				}
			}
			v.row = row
		}
		before[id] = v
	}
	q.Close()
	if err := q.Err(); err != nil {
		return nil, nil, 0, fmt.Errorf("read endpoint history: %w", err)
	}

	seen := map[string]bool{}
	for _, row := range current {
		id, _ := row.text("id")
		seen[id] = true
		v, ok := before[id]
		switch {
		case ok && v.row != nil:
			rows = append(rows, v.row)
		case ok: // deleted at or below at, and created again since
		case after[id] == "insert": // created after at
		case after[id] != "":
			rows = append(rows, row) // history starts with a change above at: its earlier state is unknown
		default:
			rows = append(rows, row)
			snapshot = append(snapshot, historyEntry{id: id, lsn: at, op: "snapshot", row: row})
		}
	}
	// Endpoints deleted since at.
	for id, v := range before {
		if !seen[id] && v.row != nil {
			rows = append(rows, v.row)
		}
	}
	return rows, snapshot, len(after), nil
}

// pruneHistorySQL removes versions no logical slot of this database can
// start before (invariant 3).
const pruneHistorySQL = `WITH horizon AS (
    SELECT min(confirmed_flush_lsn) AS lsn FROM pg_replication_slots
    WHERE slot_type = 'logical' AND database = current_database() AND confirmed_flush_lsn IS NOT NULL),
keep AS (
    SELECT DISTINCT ON (h.endpoint_id) h.endpoint_id, h.commit_lsn, h.op
    FROM relay.endpoint_history h, horizon WHERE h.commit_lsn <= horizon.lsn
    ORDER BY h.endpoint_id, h.commit_lsn DESC)
DELETE FROM relay.endpoint_history h USING keep
WHERE h.endpoint_id = keep.endpoint_id
  AND (h.commit_lsn < keep.commit_lsn OR (keep.op = 'delete' AND h.commit_lsn = keep.commit_lsn))`
