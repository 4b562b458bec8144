package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// pgLSNOID is the built-in pg_lsn type. Its binary form is an int8, which
// lets COPY write it without a text round trip.
const pgLSNOID = 3220

func registerTypes(ctx context.Context, conn *pgx.Conn) error {
	conn.TypeMap().RegisterType(&pgtype.Type{Name: "pg_lsn", OID: pgLSNOID, Codec: pgtype.Int8Codec{}})
	return nil
}

// ApplicationName is the relay's connections' application_name in
// pg_stat_activity and pg_stat_replication, unless the database URL sets
// one: the stream's, so the pool and the walsender share it.
const ApplicationName = cdc.ApplicationName

// openPool opens the pool the relay uses for everything but replication.
func openPool(ctx context.Context, url string, size int) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	cfg.MaxConns = int32(size)
	cfg.AfterConnect = registerTypes
	// pg_stat_activity names the relay's connections, and the server drops
	// them soon if the relay vanishes from the network (cdc.PrepareSession).
	cdc.PrepareSession(&cfg.ConnConfig.Config)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database pool: %w", err)
	}
	return pool, nil
}

var copyColumns = []string{
	"event_id", "endpoint_id", "tenant_id", "event_type", "state", "attempts", "http_status", "error",
	"next_attempt_at", "commit_lsn", "committed_at", "first_attempt_at", "last_attempt_at", "completed_at",
	"duration_ms", "payload", "headers", "traceparent", "event_seq",
}

const upsertSQL = `
INSERT INTO relay.deliveries (event_id, endpoint_id, tenant_id, event_type, state, attempts, http_status, error,
    next_attempt_at, commit_lsn, committed_at, first_attempt_at, last_attempt_at, completed_at, duration_ms,
    payload, headers, traceparent, event_seq)
SELECT u.event_id, u.endpoint_id, u.tenant_id, u.event_type, u.state, u.attempts, u.http_status, u.error,
    u.next_attempt_at, u.commit_lsn::pg_lsn, u.committed_at, u.first_attempt_at, u.last_attempt_at, u.completed_at,
    u.duration_ms, u.payload::jsonb, u.headers::jsonb, u.traceparent, u.event_seq
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::int4[], $8::text[],
    $9::timestamptz[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::timestamptz[],
    $15::float8[], $16::text[], $17::text[], $18::text[], $19::int4[])
    AS u(event_id, endpoint_id, tenant_id, event_type, state, attempts, http_status, error, next_attempt_at,
         commit_lsn, committed_at, first_attempt_at, last_attempt_at, completed_at, duration_ms, payload, headers, traceparent, event_seq)
ON CONFLICT (event_id, endpoint_id) DO UPDATE SET
    state = EXCLUDED.state, attempts = EXCLUDED.attempts, http_status = EXCLUDED.http_status,
    error = EXCLUDED.error, next_attempt_at = EXCLUDED.next_attempt_at, claimed_until = NULL,
    first_attempt_at = COALESCE(deliveries.first_attempt_at, EXCLUDED.first_attempt_at),
    last_attempt_at = EXCLUDED.last_attempt_at, completed_at = EXCLUDED.completed_at,
    duration_ms = EXCLUDED.duration_ms, payload = EXCLUDED.payload, headers = EXCLUDED.headers,
    updated_at = now()
WHERE deliveries.state IN ('pending', 'retrying')`

func upsertArgs(rows []*delivery) []any {
	n := len(rows)
	ids := make([][16]byte, n)
	eps, tenants, types, states := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	attempts, seqs := make([]int32, n), make([]int32, n)
	statuses := make([]*int32, n)
	errs, lsns, payloads, headers, tps := make([]*string, n), make([]*string, n), make([]*string, n), make([]*string, n), make([]*string, n)
	next, committed, first, last, completed := make([]*time.Time, n), make([]*time.Time, n), make([]*time.Time, n), make([]*time.Time, n), make([]*time.Time, n)
	durs := make([]*float64, n)
	ptrTime := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		return &t
	}
	ptrString := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	for i, d := range rows {
		ids[i], eps[i], tenants[i], types[i], states[i] = d.eventID, d.endpointID, d.tenantID, d.eventType, string(d.state)
		attempts[i], seqs[i] = int32(d.attempts), d.eventSeq
		if d.httpStatus != 0 {
			s := int32(d.httpStatus)
			statuses[i] = &s
		}
		errs[i] = ptrString(d.errText)
		if d.commitLSN != 0 {
			lsns[i] = ptrString(d.commitLSN.String())
		}
		next[i], committed[i], first[i], last[i], completed[i] = ptrTime(d.nextAttempt), ptrTime(d.committedAt), ptrTime(d.firstAttempt), ptrTime(d.lastAttempt), ptrTime(d.completed)
		if !d.lastAttempt.IsZero() {
			ms := float64(d.duration) / float64(time.Millisecond)
			durs[i] = &ms
		}
		if d.state.keepsPayload() {
			payloads[i] = ptrString(string(d.payload))
			if d.headers != nil {
				headers[i] = ptrString(string(d.headers))
			}
			tps[i] = ptrString(d.traceparent)
		}
	}
	return []any{ids, eps, tenants, types, states, attempts, statuses, errs, next, lsns, committed, first, last, completed, durs, payloads, headers, tps, seqs}
}

// writer batches status rows: many workers add, one goroutine writes a
// batch per round trip (COPY for new rows, one multi-row upsert for the
// rest) and then lets the watermark pass the transactions it completed.
type writer struct {
	pool      *pgxpool.Pool
	slot      string
	log       *slog.Logger
	maxBatch  int
	interval  time.Duration
	written   func(rows []*delivery) // called after each durable batch; may be nil
	writeSecs prometheus.Histogram   // may be nil
	slowAfter time.Duration          // see stillRunning; 0: never

	mu          sync.Mutex
	buf         []*delivery
	space       *sync.Cond // signalled when buf shrinks
	maxBuffered int        // add waits while this many rows wait
	released    bool
	kick        chan struct{}

	enc *copyEncoder // see copy; owned by the goroutine in run

	// Rows are written in the order they were added (one goroutine, whole
	// batches taken from the front of buf), so "the first n rows ever
	// added are durable" is one number. Ordered endpoints wait on it (see
	// sync) before they read their rows back.
	added   uint64        // rows ever added; under mu
	durable atomic.Uint64 // rows ever written, a prefix of those added
	wrote   chan struct{} // signalled after each durable batch
}

// add queues rows for the next write. It waits while maxBuffered rows are
// already waiting, so a writer that falls behind (or a database that is
// down) slows deliveries and spills instead of growing memory.
func (w *writer) add(ds ...*delivery) {
	w.mu.Lock()
	for len(w.buf) >= w.maxBuffered && !w.released {
		w.space.Wait()
	}
	w.addLocked(ds)
}

// addNoWait queues rows even past the bound, for callers that hold other
// locks; what they add is bounded by the queues they empty.
func (w *writer) addNoWait(ds ...*delivery) {
	w.mu.Lock()
	w.addLocked(ds)
}

func (w *writer) addLocked(ds []*delivery) {
	w.buf = append(w.buf, ds...)
	w.added += uint64(len(ds))
	full := len(w.buf) >= w.maxBatch
	w.mu.Unlock()
	if full {
		select {
		case w.kick <- struct{}{}:
		default:
		}
	}
}

// take removes and returns the next batch: up to maxBatch rows, nil if
// none wait. With full set it returns nil unless a whole batch waits.
func (w *writer) take(full bool) []*delivery {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) == 0 || full && len(w.buf) < w.maxBatch {
		return nil
	}
	n := min(len(w.buf), w.maxBatch)
	out := make([]*delivery, n)
	copy(out, w.buf)
	rest := copy(w.buf, w.buf[n:])
	clear(w.buf[rest:])
	w.buf = w.buf[:rest]
	w.space.Broadcast()
	return out
}

// sync waits until every row added before it was called is durable, and
// hurries the writer along meanwhile. It returns early only when ctx ends.
func (w *writer) sync(ctx context.Context) error {
	w.mu.Lock()
	target := w.added
	w.mu.Unlock()
	for w.durable.Load() < target {
		select {
		case w.kick <- struct{}{}:
		default:
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.wrote:
		case <-time.After(w.interval):
		}
	}
	return nil
}

// release stops add from waiting: at shutdown nothing may block on a
// writer that can no longer write.
func (w *writer) release() {
	w.mu.Lock()
	w.released = true
	w.space.Broadcast()
	w.mu.Unlock()
}

// run writes until ctx is done, then drains what is left with a short
// deadline of its own so a shutdown records what was delivered.
func (w *writer) run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			for rows := w.take(false); rows != nil; rows = w.take(false) {
				if err := w.writeRetry(dctx, rows); err != nil {
					w.log.Error("status rows not written at shutdown; their events will be delivered again", slog.Int("rows", len(rows)), slog.Any("error", err))
					break
				}
			}
			cancel()
			w.release()
			return
		case <-t.C:
		case <-w.kick:
		}
		// After a tick or a kick, one batch of what waits; then more
		// batches only while whole ones wait. What arrived during a write
		// waits for the next tick: writing it at once would turn the
		// interval into "as often as Postgres commits" and, at a live
		// rate, a round trip and a commit for every few rows.
		for rows := w.take(false); rows != nil; rows = w.take(true) {
			if err := w.writeRetry(ctx, rows); err != nil {
				// Only ctx ends writeRetry; put the rows back for the drain.
				w.mu.Lock()
				w.buf = append(rows, w.buf...)
				w.mu.Unlock()
				break
			}
		}
	}
}

// writeRetry writes one batch, retrying with backoff until it succeeds or
// ctx ends. Rows stay in memory meanwhile, and the watermark waits.
func (w *writer) writeRetry(ctx context.Context, rows []*delivery) error {
	backoff := 50 * time.Millisecond
	dedupe := false
	for {
		start := time.Now()
		stop := stillRunning(w.log, w.slowAfter, "status write still running; deliveries and acknowledgements wait for it", slog.Int("rows", len(rows)))
		err := w.write(ctx, rows, dedupe)
		stop()
		took := time.Since(start)
		if w.writeSecs != nil {
			w.writeSecs.Observe(took.Seconds())
		}
		if took > 250*time.Millisecond {
			w.log.Info("slow status write", slog.Int("rows", len(rows)), slog.Duration("took", took))
		}
		if err == nil {
			for _, d := range rows {
				if d.mark != nil {
					d.mark.done(1)
					d.mark = nil
				}
				d.persisted = true
			}
			if w.written != nil {
				w.written(rows)
			}
			w.durable.Add(uint64(len(rows)))
			select {
			case w.wrote <- struct{}{}:
			default:
			}
			return nil
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23505" {
			// A row exists that the restart lookup did not see: write this
			// batch through the upsert path, which keeps final states.
			for _, d := range rows {
				d.maybeDup = true
			}
			continue
		}
		if errors.As(err, &pgErr) && pgErr.Code == "21000" && !dedupe {
			// One upsert cannot touch a row twice. Two outcomes of one
			// delivery in a batch is a race the relay means to rule out
			// (see lane.go); should one slip through, the later outcome
			// stands rather than the writer stalling on the batch forever.
			w.log.Warn("a status batch held two rows for one delivery; writing the later one", slog.Int("rows", len(rows)))
			dedupe = true
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		w.log.Warn("writing status rows failed; retrying", slog.Int("rows", len(rows)), slog.Duration("backoff", backoff), slog.Any("error", err))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (w *writer) write(ctx context.Context, rows []*delivery, dedupe bool) error {
	var maxLSN cdc.LSN
	for _, d := range rows {
		if d.mark != nil && d.endLSN > maxLSN {
			maxLSN = d.endLSN
		}
	}
	if oneTrip(rows) {
		return w.writeFresh(ctx, oneTripSQL(w.slot, maxLSN), rows)
	}
	if len(rows) <= smallWrite {
		upserts := rows
		if dedupe {
			upserts = lastPerDelivery(rows)
		}
		return w.writeSmall(ctx, upserts, failedAttempts(rows), maxLSN)
	}
	return w.writeTx(ctx, rows, dedupe, maxLSN)
}

// writeTx writes a batch in an explicit transaction: COPY for the new
// rows, the upsert for the others, COPY for failed attempts' rows, and
// the recorded LSN.
func (w *writer) writeTx(ctx context.Context, rows []*delivery, dedupe bool, maxLSN cdc.LSN) error {
	fresh := make([]*delivery, 0, len(rows))
	var other []*delivery
	for _, d := range rows {
		if d.persisted || d.maybeDup {
			other = append(other, d)
		} else {
			fresh = append(fresh, d)
		}
	}
	tx, err := w.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin status write: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit it is a no-op
	if len(fresh) > 0 {
		if err := w.copy(ctx, tx.Conn().PgConn(), copyDeliveriesSQL, fresh, encodeDelivery); err != nil {
			return fmt.Errorf("copy status rows: %w", err)
		}
	}
	if dedupe {
		other = lastPerDelivery(other)
	}
	if len(other) > 0 {
		if _, err := tx.Exec(ctx, upsertSQL, upsertArgs(other)...); err != nil {
			return fmt.Errorf("upsert status rows: %w", err)
		}
	}
	if failed := failedAttempts(rows); len(failed) > 0 {
		if err := w.copy(ctx, tx.Conn().PgConn(), copyAttemptsSQL, failed, encodeAttempt); err != nil {
			return fmt.Errorf("copy attempt rows: %w", err)
		}
	}
	if maxLSN != 0 {
		if _, err := tx.Exec(ctx, recordLSNSQL, w.slot, int64(maxLSN)); err != nil {
			return fmt.Errorf("record lsn: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit status write: %w", err)
	}
	return nil
}

// smallWrite is the largest batch written as one pipelined round trip
// (an upsert, the attempt rows and relay_state in an implicit
// transaction). Larger batches use COPY, which is cheaper per row but
// takes four round trips (BEGIN, COPY, relay_state, COMMIT): at a live
// rate of a few thousand events a second the batches are small and the
// round trips are what the writer costs.
const smallWrite = 64

const recordLSNSQL = `INSERT INTO relay.relay_state (slot_name, recorded_lsn) VALUES ($1, pg_lsn '0/0' + $2` + lsnSQLTail

const insertAttemptsSQL = `INSERT INTO relay.attempts (event_id, endpoint_id, attempt, attempted_at, duration_ms, http_status, error_class, error)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[], $5::float8[], $6::int4[], $7::text[], $8::text[])`

// writeSmall writes a small batch in one round trip: the status rows
// (each delivery at most once), and the attempt rows of failed attempts.
// The upsert keeps a final state that is already recorded, as the COPY
// path's fallback does.
func (w *writer) writeSmall(ctx context.Context, rows, failed []*delivery, maxLSN cdc.LSN) error {
	b := &pgx.Batch{}
	b.Queue(upsertSQL, upsertArgs(rows)...)
	if len(failed) > 0 {
		b.Queue(insertAttemptsSQL, attemptArgs(failed)...)
	}
	if maxLSN != 0 {
		b.Queue(recordLSNSQL, w.slot, int64(maxLSN))
	}
	if err := w.pool.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("write status rows: %w", err)
	}
	return nil
}

// oneTrip says whether a batch can be written by writeFresh: every row
// is new (nothing recorded for it yet, so nothing to upsert) and none
// carries a failed attempt's row (a second COPY stream in the same query
// is not possible).
func oneTrip(rows []*delivery) bool {
	for _, d := range rows {
		if d.persisted || d.maybeDup || hasAttemptRow(d) {
			return false
		}
	}
	return true
}

// oneTripSQL is writeFresh's simple-protocol query: the COPY, then
// recordLSNSQL with the slot and LSN as literals when lsn is set. The
// slot needs no quoting: Config.Validate accepts only names that
// cdc.ValidName does.
func oneTripSQL(slot string, lsn cdc.LSN) string {
	if lsn == 0 {
		return copyDeliveriesSQL
	}
	return copyDeliveriesSQL + `; INSERT INTO relay.relay_state (slot_name, recorded_lsn) VALUES ('` + slot + `', pg_lsn '0/0' + ` +
		strconv.FormatInt(int64(lsn), 10) + lsnSQLTail
}

// writeFresh writes new status rows in one round trip: sql (oneTripSQL)
// runs the binary COPY and records the LSN, and Postgres runs it as one
// implicit transaction. It costs the server less per row than the unnest
// upsert (about half at 64 rows; BenchmarkStatusWrite), and the relay no
// argument arrays. A row that exists after all (unique violation) sends
// the batch down the upsert path, as the COPY in writeTx does.
func (w *writer) writeFresh(ctx context.Context, sql string, rows []*delivery) error {
	conn, err := w.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("write status rows: %w", err)
	}
	defer conn.Release()
	if err := w.copy(ctx, conn.Conn().PgConn(), sql, rows, encodeDelivery); err != nil {
		return fmt.Errorf("copy status rows: %w", err)
	}
	return nil
}

// copy runs one binary COPY of rows on conn with the writer's encoder,
// which is reused from batch to batch, also after a failed COPY: the
// reader pgconn may leave running stops at copyReader.close.
func (w *writer) copy(ctx context.Context, conn *pgconn.PgConn, sql string, rows []*delivery, encode func(*copyEncoder, *delivery)) error {
	if w.enc == nil {
		w.enc = &copyEncoder{}
	}
	return w.enc.copy(ctx, conn, sql, rows, encode)
}

const lsnSQLTail = `::int8)
ON CONFLICT (slot_name) DO UPDATE SET recorded_lsn = GREATEST(relay_state.recorded_lsn, EXCLUDED.recorded_lsn), updated_at = now()`

func attemptArgs(rows []*delivery) []any {
	n := len(rows)
	ids, eps, classes := make([][16]byte, n), make([]string, n), make([]string, n)
	attempts := make([]int32, n)
	at := make([]time.Time, n)
	durs := make([]float64, n)
	statuses := make([]*int32, n)
	errs := make([]*string, n)
	for i, d := range rows {
		ids[i], eps[i], classes[i], attempts[i], at[i] = d.eventID, d.endpointID, d.failClass, int32(d.attempts), d.lastAttempt
		durs[i] = float64(d.duration) / float64(time.Millisecond)
		if d.httpStatus != 0 {
			s := int32(d.httpStatus)
			statuses[i] = &s
		}
		if d.errText != "" {
			e := d.errText
			errs[i] = &e
		}
	}
	return []any{ids, eps, attempts, at, durs, statuses, classes, errs}
}

// lastPerDelivery keeps the last of rows for each (event, endpoint), in order.
func lastPerDelivery(rows []*delivery) []*delivery {
	last := make(map[pairKey]int, len(rows))
	for i, d := range rows {
		last[pairKey{d.eventID, d.endpointID}] = i
	}
	out := make([]*delivery, 0, len(last))
	for i, d := range rows {
		if last[pairKey{d.eventID, d.endpointID}] == i {
			out = append(out, d)
		}
	}
	return out
}

var attemptColumns = []string{"event_id", "endpoint_id", "attempt", "attempted_at", "duration_ms", "http_status", "error_class", "error"}

// hasAttemptRow says whether d's outcome is a failed attempt, which
// relay.attempts records.
func hasAttemptRow(d *delivery) bool { return d.failClass != "" && !d.lastAttempt.IsZero() }

func failedAttempts(rows []*delivery) []*delivery {
	var out []*delivery
	for _, d := range rows {
		if hasAttemptRow(d) {
			out = append(out, d)
		}
	}
	return out
}

// rowQuerier is what reads one row: a pool or a single connection.
type rowQuerier interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}

// recordedLSN reads the highest commit end LSN with a recorded row (0
// when no relay has recorded one on slot).
func recordedLSN(ctx context.Context, db rowQuerier, slot string) (cdc.LSN, error) {
	var s string
	err := db.QueryRow(ctx, `SELECT recorded_lsn::text FROM relay.relay_state WHERE slot_name = $1`, slot).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read relay_state: %w", err)
	}
	return pglogrepl.ParseLSN(s)
}

// LostSlot says that a replication slot was created where a relay had
// streamed from a slot of that name before: it was dropped, or the
// database failed over to a server without it. Events committed between
// the old slot's last position and the new one were never read from the
// WAL; they stay in relay.outbox, without delivery rows.
type LostSlot struct {
	Created     cdc.LSN // where the new slot starts
	Recorded    cdc.LSN // the highest commit the relay had recorded rows for
	Undelivered int64   // relay.outbox rows without a delivery row: the gap's, while retained, and any other never read
}

func (g *LostSlot) Error() string {
	return fmt.Sprintf("the replication slot was missing and has been created anew, but a relay had recorded events up to %s on a slot of this name "+
		"(the slot was dropped, or the database failed over to a server without it): events committed in between were never read from the WAL "+
		"and will not be delivered; %d rows of relay.outbox have no delivery row (they stay there for --outbox-retention)", g.Recorded, g.Undelivered)
}

// CheckLostSlot, called after stream's Setup, reports a *LostSlot when
// Setup created slot and relay.relay_state shows that a relay had
// recorded events on a slot of that name before; nil when Setup found the
// slot, or on a first start.
func CheckLostSlot(ctx context.Context, db rowQuerier, stream *cdc.Stream, slot string) (*LostSlot, error) {
	created := stream.SlotCreatedAt()
	if created == 0 {
		return nil, nil
	}
	recorded, err := recordedLSN(ctx, db, slot)
	if err != nil || recorded == 0 {
		return nil, err
	}
	g := &LostSlot{Created: created, Recorded: recorded}
	if err := db.QueryRow(ctx, `SELECT count(*) FROM relay.outbox o WHERE NOT EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.event_id = o.id)`).Scan(&g.Undelivered); err != nil {
		return nil, fmt.Errorf("count outbox rows without delivery rows: %w", err)
	}
	return g, nil
}

type pairKey struct {
	event    [16]byte
	endpoint string
}

// existingRows returns which (event, endpoint) pairs already have a row.
func existingRows(ctx context.Context, pool *pgxpool.Pool, events [][16]byte) (map[pairKey]bool, error) {
	rows, err := pool.Query(ctx, `SELECT event_id, endpoint_id FROM relay.deliveries WHERE event_id = ANY($1::uuid[])`, events)
	if err != nil {
		return nil, fmt.Errorf("look up recorded deliveries: %w", err)
	}
	out := make(map[pairKey]bool)
	var k pairKey
	_, err = pgx.ForEachRow(rows, []any{&k.event, &k.endpoint}, func() error {
		out[k] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("look up recorded deliveries: %w", err)
	}
	return out, nil
}

const claimSQL = `
WITH due AS (
    SELECT event_id, endpoint_id, payload IS NULL AS by_ref FROM relay.deliveries
    WHERE state IN ('pending', 'retrying') AND claimed_until IS NULL AND next_attempt_at <= now()
      AND NOT (endpoint_id = ANY($3::text[]))
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
` + claimDueRowsSQL

// claimDueRowsSQL follows a CTE "due" (event_id, endpoint_id, by_ref) of
// locked rows: it claims them for the lease in $2 and returns what
// scanClaimed reads.
const claimDueRowsSQL = `UPDATE relay.deliveries d SET claimed_until = now() + $2::interval
FROM due LEFT JOIN relay.outbox o ON due.by_ref AND o.id = due.event_id
WHERE d.event_id = due.event_id AND d.endpoint_id = due.endpoint_id
RETURNING d.event_id, d.endpoint_id, d.tenant_id, d.event_type, d.attempts,
    -- A row spilled without its payload reads it from its outbox row.
    COALESCE(d.payload, o.payload)::text,
    CASE WHEN d.payload IS NULL THEN o.headers ELSE d.headers END::text,
    CASE WHEN d.payload IS NULL THEN o.traceparent ELSE d.traceparent END,
    (d.commit_lsn - '0/0')::int8, d.committed_at, d.first_attempt_at, d.next_attempt_at, d.event_seq`

// claimProbesSQL claims at most one due row of each endpoint in $1 (a
// probe for its open circuit), the oldest in commit order, through
// deliveries_ordered_idx.
const claimProbesSQL = `
WITH due AS (
    SELECT p.event_id, p.endpoint_id, p.payload IS NULL AS by_ref
    FROM unnest($1::text[]) AS e(id)
    CROSS JOIN LATERAL (
        SELECT event_id, endpoint_id, payload FROM relay.deliveries
        WHERE endpoint_id = e.id AND state IN ('pending', 'retrying') AND claimed_until IS NULL AND next_attempt_at <= now()
        ORDER BY commit_lsn, event_seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED) p)
` + claimDueRowsSQL

// claimProbes claims one due row of each endpoint in ids.
func claimProbes(ctx context.Context, pool *pgxpool.Pool, ids []string, lease time.Duration) ([]*delivery, error) {
	rows, err := pool.Query(ctx, claimProbesSQL, ids, lease.String())
	if err != nil {
		return nil, fmt.Errorf("claim probes: %w", err)
	}
	return scanClaimed(rows, false)
}

// releaseExpiredSQL makes rows whose claim has lapsed claimable again
// (claimSQL reads only unclaimed rows, through deliveries_due_unclaimed_idx;
// this walks deliveries_claimed_idx, and only its lapsed part).
const releaseExpiredSQL = `UPDATE relay.deliveries SET claimed_until = NULL
WHERE state IN ('pending', 'retrying') AND claimed_until IS NOT NULL AND claimed_until < now()`

// releaseExpired releases lapsed claims and says how many there were.
func releaseExpired(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	tag, err := pool.Exec(ctx, releaseExpiredSQL)
	if err != nil {
		return 0, fmt.Errorf("release lapsed claims: %w", err)
	}
	return tag.RowsAffected(), nil
}

// claimDue claims up to n due pending or retrying deliveries for lease,
// leaving out the ordered endpoints in lanes: their rows are loaded in
// commit order by their lanes (see claimLanes).
func claimDue(ctx context.Context, pool *pgxpool.Pool, n int, lease time.Duration, exclude []string) ([]*delivery, error) {
	if exclude == nil {
		exclude = []string{}
	}
	rows, err := pool.Query(ctx, claimSQL, n, lease.String(), exclude)
	if err != nil {
		return nil, fmt.Errorf("claim due deliveries: %w", err)
	}
	return scanClaimed(rows, false)
}

// scanClaimed reads the rows of claimSQL or claimLanesSQL; withNext keeps
// next_attempt_at in nextAttempt (the lanes look at it; the loaded
// delivery must not carry it into its outcome row).
func scanClaimed(rows pgx.Rows, withNext bool) ([]*delivery, error) {
	defer rows.Close()
	var out []*delivery
	for rows.Next() {
		d := &delivery{persisted: true}
		var payload, headers, tp *string
		var lsn *int64
		var seq *int32
		var committed, first, next *time.Time
		if err := rows.Scan(&d.eventID, &d.endpointID, &d.tenantID, &d.eventType, &d.attempts, &payload, &headers, &tp, &lsn, &committed, &first, &next, &seq); err != nil {
			return nil, fmt.Errorf("claim due deliveries: %w", err)
		}
		if lsn != nil {
			d.commitLSN = cdc.LSN(*lsn)
		}
		if seq != nil {
			d.eventSeq = *seq
		}
		if next != nil && withNext {
			d.nextAttempt = *next
		}
		if payload != nil { // nil: spilled by reference, and the outbox row is gone
			d.payload = []byte(*payload)
		}
		if headers != nil {
			d.headers = []byte(*headers)
		}
		if tp != nil {
			d.traceparent = *tp
		}
		if committed != nil {
			d.committedAt = *committed
		}
		if first != nil {
			d.firstAttempt = *first
		}
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("claim due deliveries: %w", err)
	}
	return out, nil
}
