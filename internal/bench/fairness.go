package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
)

// The fairness phase (issue 4), with the relay: tenant B commits single-row
// events at --rate for --duration to a fast endpoint, first with tenant A
// idle, then while tenant A has a large backlog for an endpoint whose
// receiver answers slowly. B's latency is measured the same way as the
// latency phase's, both times in the same run.

const (
	tagFairA     uint32 = 0xbe000009
	tagFairIdle  uint32 = 0xbe00000a
	tagFairBusy  uint32 = 0xbe00000b
	tagFairProbe uint32 = 0xbe00000c
)

// Fairness is the fairness phase's figures.
type Fairness struct {
	Backlog    int      `json:"a_backlog"`
	SlowMillis float64  `json:"a_receiver_delay_ms"`
	Idle       *Latency `json:"b_with_a_idle"`
	Busy       *Latency `json:"b_with_a_backlog"`
	AAtStart   int64    `json:"a_delivered_at_busy_start"`
	AAtEnd     int64    `json:"a_delivered_at_busy_end"`
	ADrainSecs float64  `json:"a_drain_s"` // backlog insert done to A's last delivery
	// AReadSecs: from the end of A's backlog insert until the relay had
	// read all of it from the WAL (outbox_relay_events_received_total);
	// B's measured run starts then, with A's backlog queued. -1 if unread.
	AReadSecs float64 `json:"a_read_s"`
	A         Counts  `json:"a"`
	P99Ratio  float64 `json:"b_p99_ratio"` // busy / idle
	// AfterRatio is the same ratio of B's p99 counted from each COMMIT's
	// return: the relay's share, without the producer's own commit.
	AfterRatio  float64 `json:"b_after_commit_p99_ratio"`
	Spilled     float64 `json:"spilled"` // relay metric over the phase; -1 if unread
	Loaded      float64 `json:"loaded"`
	TargetRatio float64 `json:"target_ratio"`
}

// TargetFairnessRatio: B's p99 with A's backlog within 2x of A idle (issue 4).
const TargetFairnessRatio = 2.0

// startSlowReceiver is a receiver that waits delay before answering.
func startSlowReceiver(delay time.Duration) (*receiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rc := &receiver{ln: ln, url: "http://" + ln.Addr().String() + "/slow"}
	rc.bufs.New = func() any { b := make([]byte, 0, 4096); return &b }
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		time.Sleep(delay)
		rc.ServeHTTP(w, req)
	})
	rc.srv = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute}
	go rc.srv.Serve(ln) //nolint:errcheck // ends with Close
	return rc, nil
}

func (r *run) fairness(ctx context.Context) error {
	if r.relay == nil {
		r.progress("starting the relay")
		if err := r.startRelay(); err != nil {
			return err
		}
	}
	delay := r.cfg.FairDelay
	slow, err := startSlowReceiver(delay)
	if err != nil {
		return err
	}
	defer slow.close()
	secret := r.secretText
	for _, ep := range []struct{ id, tenant, url string }{{"ep_fair_a", "fair-a", slow.url}, {"ep_fair_b", "fair-b", r.rcv.url}} {
		if _, err := r.pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ($1, $2, $3, ARRAY[$4])`,
			ep.id, ep.tenant, ep.url, secret); err != nil {
			return fmt.Errorf("register endpoint: %w", err)
		}
	}
	insertA := `INSERT INTO relay.outbox (id, tenant_id, event_type, payload, endpoint_id) VALUES ($1, 'fair-a', 'bench.event', $2, 'ep_fair_a')`
	insertB := `INSERT INTO relay.outbox (id, tenant_id, event_type, payload, endpoint_id) VALUES ($1, 'fair-b', 'bench.event', $2, 'ep_fair_b')`
	// One probe per endpoint: the relay has the new endpoints.
	probeA := newTally(tagFairProbe, 2, r.cfg.BodyBytes, false, nil)
	probeB := newTally(tagFairProbe, 2, r.cfg.BodyBytes, false, nil)
	slow.expect(probeA)
	r.rcv.expect(probeB)
	body := appendBody(nil, 0, time.Now().UnixNano(), r.cfg.BodyBytes)
	if _, err := r.pool.Exec(ctx, insertA, eventID(tagFairProbe, 0), body); err != nil {
		return err
	}
	if _, err := r.pool.Exec(ctx, insertB, eventID(tagFairProbe, 1), body); err != nil {
		return err
	}
	for _, p := range []*tally{probeA, probeB} {
		deadline := time.Now().Add(time.Minute)
		for p.distinct.Load() < 1 {
			if time.Now().After(deadline) {
				return fmt.Errorf("fairness probe: the relay did not deliver to the new endpoints within a minute")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	spilled0 := r.relay.metric(ctx, "outbox_relay_spilled_total")
	loaded0 := r.relay.metric(ctx, "outbox_relay_loaded_total")
	n := int(float64(r.cfg.Rate) * r.cfg.Duration.Seconds())
	steadyB := func(tag uint32) (*Latency, error) {
		tl := newTally(tag, n, r.cfg.BodyBytes, true, r.verifier())
		r.rcv.expect(tl)
		vac0 := r.autovacuums(ctx)
		cpu0 := r.cpuNow()
		steady, err := r.produceSteady(ctx, insertB, tag)
		if err != nil {
			return nil, fmt.Errorf("producer: %w", err)
		}
		if err := r.wait(ctx, tl, r.cfg.Timeout); err != nil {
			return nil, err
		}
		l := steady.latency(tl)
		l.CPU = split(cpu0, r.cpuNow(), steady.sent)
		if vac0 >= 0 {
			if vac1 := r.autovacuums(ctx); vac1 >= 0 {
				l.Autovacuums = vac1 - vac0
			}
		}
		return l, nil
	}

	f := &Fairness{Backlog: r.cfg.FairBacklog, SlowMillis: ms(delay), TargetRatio: TargetFairnessRatio}
	r.progress("fairness: tenant B at %d/s for %s, tenant A idle", r.cfg.Rate, r.cfg.Duration)
	if f.Idle, err = steadyB(tagFairIdle); err != nil {
		return fmt.Errorf("tenant B with A idle: %w", err)
	}

	r.progress("fairness: inserting tenant A's backlog of %d events for a receiver answering in %s", r.cfg.FairBacklog, delay)
	ta := newTally(tagFairA, r.cfg.FairBacklog, r.cfg.BodyBytes, false, nil)
	slow.expect(ta)
	received0 := r.relay.metric(ctx, "outbox_relay_events_received_total")
	conn, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	cols := []string{"id", "tenant_id", "event_type", "payload", "endpoint_id"}
	bodies := make([][]byte, r.cfg.TxnRows)
	for from := 0; from < r.cfg.FairBacklog; from += r.cfg.TxnRows {
		m := min(r.cfg.TxnRows, r.cfg.FairBacklog-from)
		now := time.Now().UnixNano()
		for i := range m {
			bodies[i] = appendBody(bodies[i][:0], from+i, now, r.cfg.BodyBytes)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			_, err := tx.CopyFrom(ctx, pgx.Identifier{"relay", "outbox"}, cols, pgx.CopyFromSlice(m, func(i int) ([]any, error) {
				return []any{eventID(tagFairA, from+i), "fair-a", "bench.event", bodies[i], "ep_fair_a"}, nil
			}))
			return err
		})
		if err != nil {
			conn.Release()
			return fmt.Errorf("insert A's backlog: %w", err)
		}
	}
	conn.Release()
	inserted := time.Now()
	for ta.distinct.Load() == 0 { // A is being delivered
		if err := r.relay.exited(); err != nil {
			return err
		}
		if time.Since(inserted) > time.Minute {
			return fmt.Errorf("no delivery of A's backlog within a minute")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// "A has 100,000 events queued" (issue 4): B's run starts once the
	// relay has read A's whole backlog. Until then B's events are in the
	// WAL behind A's, and one slot's walsender decodes them in commit
	// order whatever the relay does; AReadSecs says how long that took.
	f.AReadSecs = -1
	if received0 >= 0 {
		for {
			if got := r.relay.metric(ctx, "outbox_relay_events_received_total"); got >= received0+float64(r.cfg.FairBacklog) {
				f.AReadSecs = time.Since(inserted).Seconds()
				break
			}
			if err := r.relay.exited(); err != nil {
				return err
			}
			if time.Since(inserted) > time.Minute {
				return fmt.Errorf("the relay did not read A's backlog within a minute")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	f.AAtStart = ta.distinct.Load()
	r.progress("fairness: tenant B at %d/s for %s, tenant A's backlog draining (%d of %d delivered)", r.cfg.Rate, r.cfg.Duration, f.AAtStart, r.cfg.FairBacklog)
	if f.Busy, err = steadyB(tagFairBusy); err != nil {
		return fmt.Errorf("tenant B with A's backlog: %w", err)
	}
	f.AAtEnd = ta.distinct.Load()
	r.progress("fairness: waiting for the rest of A's backlog (%d of %d delivered)", f.AAtEnd, r.cfg.FairBacklog)
	if err := r.wait(ctx, ta, r.cfg.Timeout); err != nil {
		return fmt.Errorf("tenant A's backlog: %w", err)
	}
	f.Spilled, f.Loaded = -1, -1
	if s1 := r.relay.metric(ctx, "outbox_relay_spilled_total"); s1 >= 0 && spilled0 >= 0 {
		f.Spilled = s1 - spilled0
	}
	if l1 := r.relay.metric(ctx, "outbox_relay_loaded_total"); l1 >= 0 && loaded0 >= 0 {
		f.Loaded = l1 - loaded0
	}
	f.ADrainSecs = float64(ta.last.Load()-inserted.UnixNano()) / 1e9
	f.A.count(ta)
	if f.Idle.P99 > 0 {
		f.P99Ratio = f.Busy.P99 / f.Idle.P99
	}
	if f.Idle.AfterP99 > 0 {
		f.AfterRatio = f.Busy.AfterP99 / f.Idle.AfterP99
	}
	r.res.Fairness = f
	return nil
}

// autovacuums is how many autovacuum and autoanalyze runs have finished in
// the bench's database so far; -1 if it cannot be read.
func (r *run) autovacuums(ctx context.Context) int64 {
	var n int64
	if err := r.pool.QueryRow(ctx, `SELECT COALESCE(sum(autovacuum_count + autoanalyze_count), 0)::int8 FROM pg_stat_user_tables`).Scan(&n); err != nil {
		return -1
	}
	return n
}
