package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/bench/pollrelay"
)

// The peer's phases: the polling outbox relay of bench/pollrelay, run in
// this process against its own table (bench_outbox, LIKE relay.outbox, not
// in the relay's publication), posting to the same receiver with the same
// concurrency, transport settings and signing. The relay is stopped first
// so its process and its walsender do not compete with the peer.

const (
	tagPeerDrain   uint32 = 0xbe000006
	tagPeerLatency uint32 = 0xbe000007
	tagPeerProbe   uint32 = 0xbe000008
)

const peerTable = "bench_outbox"

// PeerDrain is the polling peer's backlog run.
type PeerDrain struct {
	Throughput
	ReceivedSecs     float64 `json:"received_s"`      // until the receiver had every event
	FirstArrivalSecs float64 `json:"first_arrival_s"` // peer start to first delivery
	LeftRows         int     `json:"rows_left"`       // rows still in the peer's table at the end
	InsertPerSec     float64 `json:"insert_rows_per_s"`
	WALPerEvent      float64 `json:"wal_bytes_per_event"` // the peer's own writes (locks, deletes)
	Claims           int64   `json:"claims"`
	FailedPosts      int64   `json:"failed_posts"`
}

// retireRelay records the relay's peak RSS and stops it, once.
func (r *run) retireRelay() error {
	if r.relay == nil {
		return nil
	}
	if err := r.relay.exited(); err != nil {
		return err
	}
	r.res.RelayPeakRSS, _, _ = r.relay.memory()
	r.progress("stopping the relay before the peer's phases")
	r.relay.stop(30 * time.Second)
	r.relay = nil
	r.retired = true
	return nil
}

func (r *run) peerConfig() pollrelay.Config {
	return pollrelay.Config{Pool: r.pool, Table: peerTable, URL: r.rcv.url, Secret: r.secret, Workers: r.cfg.Workers}
}

// startPeer runs the peer until the returned stop is called.
func (r *run) startPeer(ctx context.Context) (stats *pollrelay.Stats, stop func() error) {
	return r.startPeerWith(ctx, r.peerConfig())
}

// startPeerWith runs the peer with cfg until the returned stop is called.
func (r *run) startPeerWith(ctx context.Context, cfg pollrelay.Config) (stats *pollrelay.Stats, stop func() error) {
	ctx, cancel := context.WithCancel(ctx)
	stats = new(pollrelay.Stats)
	done := make(chan error, 1)
	go func() { done <- pollrelay.Run(ctx, cfg, stats) }()
	var once sync.Once
	var err error
	return stats, func() error { once.Do(func() { cancel(); err = <-done }); return err }
}

func (r *run) peerSetup(ctx context.Context) error {
	if err := r.retireRelay(); err != nil {
		return err
	}
	return pollrelay.CreateTable(ctx, r.pool, peerTable)
}

// peerRows counts the rows left in the peer's table.
func (r *run) peerRows(ctx context.Context) (int, error) {
	var n int
	err := r.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{peerTable}.Sanitize()).Scan(&n)
	return n, err
}

// peerDrain inserts the same backlog into the peer's table, the same way,
// and times the peer draining it: from start until the receiver has every
// event and the table is empty.
func (r *run) peerDrain(ctx context.Context) error {
	if err := r.peerSetup(ctx); err != nil {
		return err
	}
	r.progress("inserting %d events into %s for the polling peer", r.cfg.Events, peerTable)
	conn, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	cols := []string{"id", "tenant_id", "event_type", "payload"}
	bodies := make([][]byte, r.cfg.TxnRows)
	for from := 0; from < r.cfg.Events; from += r.cfg.TxnRows {
		n := min(r.cfg.TxnRows, r.cfg.Events-from)
		now := time.Now().UnixNano()
		for i := range n {
			bodies[i] = appendBody(bodies[i][:0], from+i, now, r.cfg.BodyBytes)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			_, err := tx.CopyFrom(ctx, pgx.Identifier{peerTable}, cols, pgx.CopyFromSlice(n, func(i int) ([]any, error) {
				return []any{eventID(r.tag(tagPeerDrain), from+i), "bench", "bench.event", bodies[i]}, nil
			}))
			return err
		})
		if err != nil {
			conn.Release()
			return fmt.Errorf("insert peer backlog: %w", err)
		}
	}
	conn.Release()
	insertRate := float64(r.cfg.Events) / time.Since(start).Seconds()
	// Analyze, as autovacuum would soon after such a load, so the claim
	// query uses the created_at index.
	if _, err := r.pool.Exec(ctx, `ANALYZE `+pgx.Identifier{peerTable}.Sanitize()); err != nil {
		return err
	}

	tl := newTally(r.tag(tagPeerDrain), r.cfg.Events, r.cfg.BodyBytes, false, r.verifier())
	r.rcv.expect(tl)
	r.progress("polling peer drains %d events (%d workers)", r.cfg.Events, r.cfg.Workers)
	d, err := r.timePeerDrain(ctx, tl, r.peerConfig(), r.cfg.Events, insertRate)
	if err != nil {
		return err
	}
	r.res.PeerDrain = d
	return nil
}

// timePeerDrain runs the peer with cfg from now until the receiver has
// every event of tl and the peer's table is empty, and returns the
// figures of the drain of n events.
func (r *run) timePeerDrain(ctx context.Context, tl *tally, cfg pollrelay.Config, n int, insertRate float64) (*PeerDrain, error) {
	lsn0, err := r.walLSN(ctx)
	if err != nil {
		return nil, err
	}
	cpu0 := r.cpuNow()
	start := time.Now()
	stats, stop := r.startPeerWith(ctx, cfg)
	werr := r.wait(ctx, tl, r.cfg.Timeout)
	received := time.Since(start)
	left := -1
	if werr == nil {
		deadline := time.Now().Add(r.cfg.Timeout)
		for {
			if left, werr = r.peerRows(ctx); werr != nil || left == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	took := time.Since(start)
	cpu1 := r.cpuNow()
	if err := stop(); err != nil && werr == nil {
		werr = err
	}
	if werr != nil {
		return nil, werr
	}
	lsn1, err := r.walLSN(ctx)
	if err != nil {
		return nil, err
	}
	d := &PeerDrain{
		Throughput:       Throughput{Seconds: took.Seconds(), PerSec: float64(n) / took.Seconds(), CPU: split(cpu0, cpu1, n)},
		ReceivedSecs:     received.Seconds(),
		FirstArrivalSecs: float64(tl.first.Load()-start.UnixNano()) / 1e9,
		LeftRows:         left,
		InsertPerSec:     insertRate,
		WALPerEvent:      float64(lsn1-lsn0) / float64(max(1, n)),
		Claims:           stats.Claims.Load(),
		FailedPosts:      stats.Failed.Load(),
	}
	d.count(tl)
	return d, nil
}

// peerLatency is the latency phase with the peer delivering: the same
// producer (single-row autocommit INSERTs at --rate on --producers
// connections, clock read just before the INSERT) into the peer's table.
func (r *run) peerLatency(ctx context.Context) error {
	if err := r.peerSetup(ctx); err != nil {
		return err
	}
	_, stop := r.startPeer(ctx)
	defer stop() //nolint:errcheck // the error is taken below on the success path
	table := pgx.Identifier{peerTable}.Sanitize()
	insert := `INSERT INTO ` + table + ` (id, tenant_id, event_type, payload) VALUES ($1, 'bench', 'bench.event', $2)`

	probe := newTally(r.tag(tagPeerProbe), 1, r.cfg.BodyBytes, false, nil)
	r.rcv.expect(probe)
	if _, err := r.pool.Exec(ctx, insert, eventID(r.tag(tagPeerProbe), 0), appendBody(nil, 0, time.Now().UnixNano(), r.cfg.BodyBytes)); err != nil {
		return fmt.Errorf("insert probe: %w", err)
	}
	if err := r.wait(ctx, probe, time.Minute); err != nil {
		return fmt.Errorf("peer probe event: %w", err)
	}

	n := int(float64(r.cfg.Rate) * r.cfg.Duration.Seconds())
	tl := newTally(r.tag(tagPeerLatency), n, r.cfg.BodyBytes, true, r.verifier())
	r.rcv.expect(tl)
	lsn0, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	r.progress("steady producer: %d single-row transactions/s for %s on %d connections, polling peer delivering", r.cfg.Rate, r.cfg.Duration, r.cfg.Producers)
	steady, err := r.produceSteady(ctx, insert, r.tag(tagPeerLatency))
	if err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	if err := r.wait(ctx, tl, r.cfg.Timeout); err != nil {
		return err
	}
	// Stop only once the delivered rows are deleted: a batch cut short is
	// rolled back, and the next run of the peer would deliver it again.
	for deadline := time.Now().Add(r.cfg.Timeout); ; time.Sleep(10 * time.Millisecond) {
		left, err := r.peerRows(ctx)
		if err != nil {
			return err
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s: %d rows left in %s", r.cfg.Timeout, left, peerTable)
		}
	}
	if err := stop(); err != nil {
		return err
	}
	lsn1, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	l := steady.latency(tl)
	// No process CPU: the peer runs inside the bench process.
	c := cost(0, steady.sent, lsn1-lsn0)
	l.Cost = &c
	r.res.PeerLatency = l
	return nil
}
