package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/relaytest"
)

// Every write path (the hand-written binary COPY in a transaction for
// large batches, the pipelined upsert for small ones, and the one-trip
// COPY for batches of new rows without failed attempts) must store
// exactly what the rows say, for every column, NULLs included; COPY must
// stream batches larger than one chunk; the recorded LSN must follow.
func TestStatusRowsRoundTrip(t *testing.T) {
	t.Parallel()
	t.Run("copy", func(t *testing.T) { t.Parallel(); testStatusRows(t, 3000, false) })
	t.Run("small", func(t *testing.T) { t.Parallel(); testStatusRows(t, 0, false) })
	t.Run("one-trip", func(t *testing.T) { t.Parallel(); testStatusRows(t, 3000, true) })
	t.Run("one-trip-small", func(t *testing.T) { t.Parallel(); testStatusRows(t, 0, true) })
}

func testStatusRows(t *testing.T, padding int, trip bool) {
	if 3+padding <= smallWrite == (padding > 0) {
		t.Fatalf("padding %d does not pick the intended path", padding)
	}
	e, w := newTestWriter(t, "copy")
	pool := w.pool
	ctx := context.Background()

	at := time.Date(2026, 11, 30, 12, 34, 56, 789012000, time.UTC)
	big := `{"pad": "` + strings.Repeat("é", 100<<10) + `"}` // spans several 64 KiB chunks
	full := &delivery{
		eventID: [16]byte{0x4b, 0xf9, 0x2f, 0x35, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, endpointID: "ep_full", tenantID: "acme",
		eventType: "invoice.paid", payload: []byte(big), headers: []byte(`{"X-A": "b"}`), traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		commitLSN: 0x1_0000_ABCD, committedAt: at, state: StateRetrying, attempts: 3, httpStatus: 503, errText: "HTTP 503: busy",
		nextAttempt: at.Add(5 * time.Minute), firstAttempt: at.Add(time.Second), lastAttempt: at.Add(2 * time.Second),
		duration: 1500 * time.Microsecond, failClass: "http_5xx",
	}
	bare := &delivery{eventID: [16]byte{1}, endpointID: "", tenantID: "t", eventType: "x", state: StateUnrouted, completed: at}
	done := &delivery{eventID: [16]byte{2}, endpointID: "ep", tenantID: "t", eventType: "x", payload: []byte(`{"gone": true}`),
		state: StateSucceeded, attempts: 1, httpStatus: 204, lastAttempt: at, firstAttempt: at, completed: at, duration: 0}
	if trip {
		full.failClass = "" // no attempt row: the batch goes in one trip
	}
	rows := []*delivery{full, bare, done}
	var wm watermark
	mark := wm.add(0x2_0000_0042, 1)
	done.mark, done.endLSN = mark, mark.end
	for i := range padding { // many small rows after the big one: several chunks
		rows = append(rows, &delivery{eventID: [16]byte{3, byte(i >> 8), byte(i)}, endpointID: "ep", tenantID: "t", eventType: "x",
			payload: []byte(fmt.Sprintf(`{"i": %d}`, i)), state: StatePending, nextAttempt: at})
	}
	if oneTrip(rows) != trip {
		t.Fatalf("oneTrip = %v, want %v", !trip, trip)
	}
	if err := w.writeRetry(ctx, rows); err != nil {
		t.Fatal(err)
	}
	if lsn, err := recordedLSN(ctx, pool, e.Slot); err != nil || lsn != 0x2_0000_0042 {
		t.Errorf("recorded LSN %v, %v; want 2/42", lsn, err)
	}
	if n := mark.remaining.Load(); n != 0 {
		t.Errorf("the transaction's mark still counts %d rows", n)
	}

	type got struct {
		endpoint, tenant, typ, state, err, tp, payload, headers, lsn string
		attempts                                                     int
		status                                                       *int
		next, committed, first, last, completed                      *time.Time
		dur                                                          *float64
	}
	read := func(id [16]byte) got {
		t.Helper()
		var g got
		var errText, tp, payload, headers, lsn *string
		if err := pool.QueryRow(ctx, `SELECT endpoint_id, tenant_id, event_type, state, attempts, http_status, error, next_attempt_at,
commit_lsn::text, committed_at, first_attempt_at, last_attempt_at, completed_at, duration_ms, payload::text, headers::text, traceparent
FROM relay.deliveries WHERE event_id = $1`, id).Scan(&g.endpoint, &g.tenant, &g.typ, &g.state, &g.attempts, &g.status, &errText,
			&g.next, &lsn, &g.committed, &g.first, &g.last, &g.completed, &g.dur, &payload, &headers, &tp); err != nil {
			t.Fatal(err)
		}
		for _, p := range []struct {
			dst *string
			src *string
		}{{&g.err, errText}, {&g.lsn, lsn}, {&g.tp, tp}, {&g.payload, payload}, {&g.headers, headers}} {
			if p.src != nil {
				*p.dst = *p.src
			} else {
				*p.dst = "NULL"
			}
		}
		return g
	}
	same := func(what string, a *time.Time, b time.Time) {
		t.Helper()
		if a == nil || !a.Equal(b) {
			t.Errorf("%s = %v, want %v", what, a, b)
		}
	}

	g := read(full.eventID)
	if g.endpoint != "ep_full" || g.tenant != "acme" || g.typ != "invoice.paid" || g.state != "retrying" || g.attempts != 3 ||
		g.status == nil || *g.status != 503 || g.err != "HTTP 503: busy" || g.tp != full.traceparent || g.lsn != "1/ABCD" {
		t.Errorf("full row: %+v", g)
	}
	if g.payload != big {
		t.Errorf("payload: %d bytes back, want %d", len(g.payload), len(big))
	}
	if g.headers != `{"X-A": "b"}` {
		t.Errorf("headers = %s", g.headers)
	}
	same("next_attempt_at", g.next, full.nextAttempt)
	same("committed_at", g.committed, at)
	same("first_attempt_at", g.first, full.firstAttempt)
	same("last_attempt_at", g.last, full.lastAttempt)
	if g.completed != nil {
		t.Errorf("completed_at = %v, want NULL", g.completed)
	}
	if g.dur == nil || *g.dur != 1.5 {
		t.Errorf("duration_ms = %v, want 1.5", g.dur)
	}

	g = read(bare.eventID)
	if g.endpoint != "" || g.state != "unrouted" || g.attempts != 0 || g.status != nil || g.err != "NULL" || g.payload != "NULL" ||
		g.next != nil || g.first != nil || g.last != nil || g.dur != nil || g.lsn != "NULL" {
		t.Errorf("unrouted row: %+v", g)
	}
	same("completed_at", g.completed, at)

	// A succeeded row drops its payload; a zero duration of a real attempt is 0, not NULL.
	g = read(done.eventID)
	if g.state != "succeeded" || g.payload != "NULL" || g.dur == nil || *g.dur != 0 || *g.status != 204 {
		t.Errorf("succeeded row: %+v", g)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'pending' AND payload ? 'i'`); n != padding {
		t.Errorf("%d pending rows with their payload, want %d", n, padding)
	}
	if trip {
		if n := e.Count(`SELECT count(*) FROM relay.attempts`); n != 0 {
			t.Errorf("%d attempt rows, want none", n)
		}
		return
	}
	var class, aerr string
	var attempt, status int
	var attempted time.Time
	var dur float64
	if err := pool.QueryRow(ctx, `SELECT attempt, attempted_at, duration_ms, http_status, error_class, error FROM relay.attempts WHERE event_id = $1`,
		full.eventID).Scan(&attempt, &attempted, &dur, &status, &class, &aerr); err != nil {
		t.Fatal(err)
	}
	if attempt != 3 || !attempted.Equal(full.lastAttempt) || dur != 1.5 || status != 503 || class != "http_5xx" || aerr != "HTTP 503: busy" {
		t.Errorf("attempt row: %d %v %v %d %q %q", attempt, attempted, dur, status, class, aerr)
	}
	if n := e.Count(`SELECT count(*) FROM relay.attempts`); n != 1 {
		t.Errorf("%d attempt rows, want 1", n)
	}
}

// Two outcomes of one delivery in one batch (which the relay means never
// to produce) must not stall the writer: the later one is written, on
// either write path.
func TestWriterKeepsTheLaterOfTwoOutcomes(t *testing.T) {
	t.Parallel()
	for _, padding := range []int{0, 100} {
		t.Run(fmt.Sprint(padding), func(t *testing.T) {
			t.Parallel()
			e, w := newTestWriter(t, "dup")
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			at := time.Now()
			first := &delivery{eventID: [16]byte{9}, endpointID: "ep", tenantID: "t", eventType: "x", payload: []byte(`{}`),
				state: StateRetrying, attempts: 1, httpStatus: 503, lastAttempt: at, nextAttempt: at.Add(time.Second), failClass: "http_5xx"}
			later := *first
			later.state, later.attempts, later.httpStatus, later.completed, later.failClass = StateSucceeded, 2, 204, at, ""
			rows := []*delivery{first, &later}
			for i := range padding {
				rows = append(rows, &delivery{eventID: [16]byte{8, byte(i)}, endpointID: "ep", tenantID: "t", eventType: "x",
					payload: []byte(`{}`), state: StateSucceeded, completed: at})
			}
			if err := w.writeRetry(ctx, rows); err != nil {
				t.Fatalf("writeRetry: %v", err)
			}
			if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_id = $1 AND state = 'succeeded' AND attempts = 2`, first.eventID); n != 1 {
				t.Errorf("the later outcome is not the row")
			}
			if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE event_id = $1`, first.eventID); n != 1 {
				t.Errorf("%d attempt rows, want the failed attempt's 1", n)
			}
			if n := e.Count(`SELECT count(*) FROM relay.deliveries`); n != 1+padding {
				t.Errorf("%d rows, want %d", n, 1+padding)
			}
		})
	}
}

// newTestWriter is a status writer on a fresh database, batches of up to
// 5,000 rows, driven by the test through writeRetry, over one connection.
func newTestWriter(t testing.TB, slotPrefix string) (*relaytest.Env, *writer) {
	t.Helper()
	e := relaytest.New(t, cluster, slotPrefix)
	pool, err := openPool(context.Background(), e.URL, 1) // one backend does every write (BenchmarkStatusWrite reads its CPU)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	w := &writer{pool: pool, slot: e.Slot, log: slog.New(slog.DiscardHandler), maxBatch: 5000, maxBuffered: 5000}
	w.space = sync.NewCond(&w.mu)
	return e, w
}

// A batch of rows the writer thinks new, one of which exists (a restart
// lookup that missed it), fails its one-trip COPY as a whole, recorded
// LSN included, and is written again through the upsert, which keeps the
// final state already recorded.
func TestOneTripConflictFallsBackToTheUpsert(t *testing.T) {
	t.Parallel()
	e, w := newTestWriter(t, "trip")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	at := time.Now()
	var wm watermark
	old := &delivery{eventID: [16]byte{7}, endpointID: "ep", tenantID: "t", eventType: "x", state: StateSucceeded, attempts: 1, completed: at}
	if err := w.writeRetry(ctx, []*delivery{old}); err != nil {
		t.Fatal(err)
	}
	mark := wm.add(0x5_0000_0000, 2)
	again := &delivery{eventID: [16]byte{7}, endpointID: "ep", tenantID: "t", eventType: "x", payload: []byte(`{}`),
		state: StatePending, nextAttempt: at, mark: mark, endLSN: mark.end}
	other := &delivery{eventID: [16]byte{8}, endpointID: "ep", tenantID: "t", eventType: "x", state: StateSucceeded,
		attempts: 1, completed: at, mark: mark, endLSN: mark.end}
	rows := []*delivery{again, other}
	if !oneTrip(rows) {
		t.Fatal("the batch does not take the one-trip path")
	}
	if err := w.write(ctx, rows, false); err == nil || !strings.Contains(err.Error(), "23505") {
		t.Fatalf("one-trip write of an existing row: %v, want a unique violation", err)
	}
	if lsn, err := recordedLSN(ctx, w.pool, e.Slot); err != nil || lsn != 0 {
		t.Errorf("recorded LSN %v, %v after the failed batch; want none", lsn, err)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries`); n != 1 {
		t.Errorf("%d rows after the failed batch, want 1", n)
	}
	if err := w.writeRetry(ctx, rows); err != nil {
		t.Fatal(err)
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_id = $1 AND state = 'succeeded'`, old.eventID); n != 1 {
		t.Error("the recorded final state was overwritten")
	}
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE event_id = $1 AND state = 'succeeded'`, other.eventID); n != 1 {
		t.Error("the new row of the batch is missing")
	}
	if lsn, err := recordedLSN(ctx, w.pool, e.Slot); err != nil || lsn != 0x5_0000_0000 {
		t.Errorf("recorded LSN %v, %v; want 5/0", lsn, err)
	}
	if n := mark.remaining.Load(); n != 0 {
		t.Errorf("the mark counts %d rows", n)
	}
}

// The writer writes what waits once per interval, not as often as
// Postgres commits: rows trickling in during a write wait for the next
// tick. Whole batches go at once, without waiting for a tick.
func TestWriterBatchesPerInterval(t *testing.T) {
	t.Parallel()
	e, w := newTestWriter(t, "tick")
	const interval = 200 * time.Millisecond
	w.interval, w.maxBatch = interval, 1000
	w.kick, w.wrote = make(chan struct{}, 1), make(chan struct{}, 1)
	var mu sync.Mutex
	var batches []int
	w.written = func(rows []*delivery) {
		mu.Lock()
		batches = append(batches, len(rows))
		mu.Unlock()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx) }()
	defer func() { cancel(); <-done }()

	row := func(i int) *delivery {
		return &delivery{eventID: [16]byte{1, byte(i >> 8), byte(i)}, endpointID: "ep", tenantID: "t", eventType: "x",
			state: StateSucceeded, attempts: 1, completed: time.Now()}
	}
	// A trickle: a row every quarter millisecond or so for a second,
	// below a whole batch per tick, so rows arrive during every write.
	start := time.Now()
	trickle := 0
	for time.Since(start) < time.Second {
		w.add(row(trickle))
		trickle++
		time.Sleep(250 * time.Microsecond)
	}
	took := time.Since(start)
	if trickle >= int(took/interval)*w.maxBatch {
		t.Fatalf("%d rows in %s fill whole batches; the test needs fewer", trickle, took)
	}
	waitDurable := func(n int) {
		t.Helper()
		e.WaitFor(fmt.Sprintf("%d rows durable", n), 10*time.Second, func() bool { return w.durable.Load() >= uint64(n) })
	}
	waitDurable(trickle)
	mu.Lock()
	n := len(batches)
	mu.Unlock()
	// One batch per tick over the trickle, and one for its tail.
	if most := int(took/interval) + 2; n > most {
		t.Errorf("%d rows trickling in over %s were written in %d batches, want at most %d (one per %s tick)", trickle, took.Round(time.Millisecond), n, most, interval)
	}
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != trickle {
		t.Errorf("%d rows, want %d", got, trickle)
	}

	// A burst of whole batches is written at once: 3,000 rows, three
	// full batches, durable well before two ticks have passed.
	mu.Lock()
	batches = nil
	mu.Unlock()
	burstAt := time.Now()
	rows := make([]*delivery, 3000)
	for i := range rows {
		rows[i] = row(trickle + i)
	}
	w.add(rows...)
	waitDurable(trickle + 3000)
	if d := time.Since(burstAt); d > 2*interval {
		t.Errorf("three whole batches took %s, want under %s", d, 2*interval)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(batches) != 3 {
		t.Errorf("the burst was written in %d batches (%v), want 3 of 1,000", len(batches), batches)
	}
}

// A COPY that fails midway leaves pgconn's goroutine reading the rows;
// once close returns it reads no more, so the writer may reuse the rows'
// memory at once. (A CI run crashed on a nil row: the writer had put a
// failed batch back and cleared part of it while the abandoned COPY was
// still encoding from it.)
func TestCopyReaderStopsAtClose(t *testing.T) {
	rows := make([]*delivery, 200)
	for i := range rows {
		rows[i] = &delivery{endpointID: "ep", tenantID: "t", eventType: "x", state: StatePending,
			payload: []byte(`"` + strings.Repeat("x", copyChunk) + `"`)} // one row per chunk
	}
	var encoded atomic.Int64
	r := &copyReader{enc: &copyEncoder{}, rows: rows, encode: func(e *copyEncoder, d *delivery) {
		encoded.Add(1)
		encodeDelivery(e, d)
	}}
	// The reading goroutine reads when told to, as pgconn's does when the
	// connection has room.
	step, got := make(chan struct{}), make(chan error)
	go func() {
		buf := make([]byte, 16<<10)
		for range step {
			_, err := r.Read(buf)
			got <- err
		}
	}()
	defer close(step)
	for encoded.Load() < 3 {
		step <- struct{}{}
		if err := <-got; err != nil {
			t.Fatal(err)
		}
	}
	r.close()
	n := encoded.Load()
	clear(rows) // as the writer may, once the COPY has returned
	for range 10 {
		step <- struct{}{}
		if err := <-got; !errors.Is(err, errCopyAbandoned) {
			t.Fatalf("Read after close: %v, want errCopyAbandoned", err)
		}
	}
	if m := encoded.Load(); m != n || n >= int64(len(rows)) {
		t.Errorf("%d rows encoded by close, %d in all: want no more after close, and the test to stop it midway", n, m)
	}
}
