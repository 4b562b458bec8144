package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The memory phase (issue 4): for each --overflow policy, in a fresh
// database with its own slot, with the endpoint's receiver down (by
// default nothing listens on its port, so every connection is refused;
// with MemoryDown "503" it accepts connections and answers 503), the relay
// running, MemoryEvents events are COPYed in TxnRows-row transactions.
// The endpoint has breaker_cooldown_ms 1000, retry_schedule {0s,1s} and
// max_attempts 1000000, so its circuit opens, a probe goes every second,
// and no delivery runs out of attempts while the receiver is down or waits
// minutes for a retry once it is back (the relay's default schedule would
// put a probed delivery 5 minutes out).
//
// The relay is then left until it has accounted for what it can: under
// spill, until it has read every event and acknowledged every transaction
// (the overflow is in relay.deliveries as pending rows); under block,
// until it has read nothing for a second since the inserts ended (the
// rest waits in the slot). The receiver then stays down MemorySettle more
// (the hold), over which the spilled and loaded counters are read. The
// relay's VmRSS is sampled every 100 ms throughout; VmHWM is read when the
// receiver comes back and at the end. Then the receiver answers 204 again
// and the drain is timed until the receiver has every event and every row
// is succeeded.

// MemoryRun is one policy's figures.
type MemoryRun struct {
	Policy       string  `json:"policy"`
	Events       int     `json:"events"`
	ReceiverDown string  `json:"receiver_down"`
	InsertSecs   float64 `json:"insert_s"`
	InsertPerSec float64 `json:"insert_rows_per_s"`
	SettleSecs   float64 `json:"settle_s"` // inserts done to settled
	// The hold: MemorySettle more with the receiver down after settling.
	HoldSecs    float64 `json:"hold_s"`
	HoldSpilled float64 `json:"hold_spilled"` // outbox_relay_spilled_total over the hold
	HoldLoaded  float64 `json:"hold_loaded"`
	// What the relay held when the receiver came back.
	HeldRead     float64 `json:"events_read"`           // outbox_relay_events_received_total
	HeldQueue    float64 `json:"queue_deliveries"`      // outbox_relay_queue_deliveries
	HeldLagBytes float64 `json:"replication_lag_bytes"` // outbox_relay_replication_lag_bytes
	HeldRows     int     `json:"rows"`                  // relay.deliveries rows
	Refused      int64   `json:"answered_503"`
	// DownErrors counts relay.attempts rows by error_class when the
	// receiver comes back: what the relay saw of the outage.
	DownErrors   map[string]int `json:"attempt_errors_while_down"`
	DownMaxRSS   int64          `json:"down_max_rss_bytes"`  // largest VmRSS sample while down
	DownPeakRSS  int64          `json:"down_peak_rss_bytes"` // VmHWM when the receiver came back
	DownSamples  int            `json:"down_rss_samples"`
	ReceivedSecs float64        `json:"receiver_complete_s"` // receiver back to every event received
	DrainSecs    float64        `json:"drain_s"`             // receiver back to every event received and every row succeeded
	DrainMaxRSS  int64          `json:"drain_max_rss_bytes"` // largest VmRSS sample during the drain
	PeakRSS      int64          `json:"peak_rss_bytes"`      // VmHWM at the end
	Spilled      float64        `json:"spilled"`
	Loaded       float64        `json:"loaded"`
	Counts
	Rows Rows `json:"rows_at_end"`
	Load Load `json:"load_avg_1m"`
}

// Memory is the memory phase's figures.
type Memory struct {
	Runs      []MemoryRun `json:"runs"`
	TargetRSS int64       `json:"target_rss_bytes"`
}

// TargetMemoryRSS: relay RSS under 150 MB (MiB, as e2e's memory test
// counts it) with the receiver down and 1,000,000 events (issue 4).
const TargetMemoryRSS = 150 << 20

// Clean reports whether every run delivered every event exactly once and
// accounted for it exactly.
func (m *Memory) Clean() bool {
	for _, r := range m.Runs {
		if !r.Counts.Clean() || !r.Rows.Exact() {
			return false
		}
	}
	return true
}

// Met reports whether a run stayed under the RSS target.
func (m MemoryRun) Met() bool { return m.PeakRSS > 0 && m.PeakRSS < TargetMemoryRSS }

func (r *run) memory(ctx context.Context) error {
	m := &Memory{TargetRSS: TargetMemoryRSS}
	r.res.Memory = m
	for _, policy := range r.cfg.Faults.MemoryPolicies {
		run, err := r.memoryRun(ctx, policy)
		if run != nil {
			m.Runs = append(m.Runs, *run)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", policy, err)
		}
	}
	return nil
}

func (r *run) memoryRun(ctx context.Context, policy string) (*MemoryRun, error) {
	n := r.cfg.Faults.MemoryEvents
	tag := tagMemorySpill
	if policy == "block" {
		tag = tagMemoryBlock
	}
	timeout := max(r.cfg.Timeout, time.Duration(n)*time.Millisecond)
	db, err := r.newPhaseDB(ctx, "memory_"+policy)
	if err != nil {
		return nil, err
	}
	defer r.dropPhaseDB(db)
	tl := newTally(tag, n, r.cfg.BodyBytes, false, r.verifier())
	rc, err := startFaultReceiver(tl, false)
	if err != nil {
		return nil, err
	}
	defer rc.close()
	refuse := r.cfg.Faults.MemoryDown == MemoryDownRefuse
	downText := "503 to every request"
	if refuse {
		downText = "connections refused (nothing listening)"
		rc.stopListening()
	} else {
		rc.down.Store(true)
	}
	if err := addEndpoint(ctx, db.pool, "ep_memory", "memory", rc.url, r.secretText,
		"breaker_cooldown_ms = 1000, retry_schedule = '{0s,1s}', max_attempts = 1000000"); err != nil {
		return nil, err
	}
	p, err := r.startPhaseRelay(db, "--overflow", policy)
	if err != nil {
		return nil, err
	}
	defer func() { p.stop(30 * time.Second) }()
	if err := p.waitReady(ctx, "streaming", time.Minute); err != nil {
		return nil, err
	}
	mr := &MemoryRun{Policy: policy, Events: n, ReceiverDown: downText, Spilled: -1, Loaded: -1, Load: Load{Start: loadAvg()}}
	down := sampleRSS(p, 100*time.Millisecond)

	r.progress("memory (%s): receiver down (%s); inserting %d events with the relay running", policy, downText, n)
	start := time.Now()
	if err := copyEvents(ctx, db.pool, tag, 0, n, r.cfg.TxnRows, r.cfg.BodyBytes, "memory", "ep_memory"); err != nil {
		down.stop()
		return mr, err
	}
	inserted := time.Now()
	mr.InsertSecs = inserted.Sub(start).Seconds()
	mr.InsertPerSec = float64(n) / mr.InsertSecs

	r.progress("memory (%s): inserted in %.1fs; waiting for the relay to settle", policy, mr.InsertSecs)
	var held map[string]float64
	deadline := time.Now().Add(timeout)
	var lastRead float64 = -1
	lastChange := time.Now()
	for {
		if err := p.exited(); err != nil {
			down.stop()
			return mr, err
		}
		held, err = p.scrape(ctx)
		if err != nil {
			down.stop()
			return mr, err
		}
		read := held["outbox_relay_events_received_total"]
		if read != lastRead {
			lastRead, lastChange = read, time.Now()
		}
		if policy == "spill" && read >= float64(n) && held["outbox_relay_unacknowledged_transactions"] == 0 {
			break
		}
		if policy == "block" && time.Since(lastChange) >= time.Second {
			break
		}
		if time.Now().After(deadline) {
			down.stop()
			return mr, fmt.Errorf("relay did not settle within %s (read %.0f of %d events, %.0f queued, %.0f unacknowledged transactions)",
				timeout, read, n, held["outbox_relay_queue_deliveries"], held["outbox_relay_unacknowledged_transactions"])
		}
		select {
		case <-ctx.Done():
			down.stop()
			return mr, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	mr.SettleSecs = time.Since(inserted).Seconds()
	r.progress("memory (%s): settled %.1fs after the inserts; receiver stays down %s more", policy, mr.SettleSecs, r.cfg.Faults.MemorySettle)
	if err := pause(ctx, r.cfg.Faults.MemorySettle, p.exited); err != nil {
		down.stop()
		return mr, err
	}
	end, err := p.scrape(ctx)
	if err != nil {
		down.stop()
		return mr, err
	}
	mr.HoldSecs = r.cfg.Faults.MemorySettle.Seconds()
	mr.HoldSpilled = end["outbox_relay_spilled_total"] - held["outbox_relay_spilled_total"]
	mr.HoldLoaded = end["outbox_relay_loaded_total"] - held["outbox_relay_loaded_total"]
	held = end
	mr.HeldRead, mr.HeldQueue, mr.HeldLagBytes = held["outbox_relay_events_received_total"], held["outbox_relay_queue_deliveries"], held["outbox_relay_replication_lag_bytes"]
	if err := db.pool.QueryRow(ctx, `SELECT count(*) FROM relay.deliveries`).Scan(&mr.HeldRows); err != nil {
		down.stop()
		return mr, err
	}
	if mr.DownErrors, err = attemptErrors(ctx, db.pool); err != nil {
		down.stop()
		return mr, err
	}
	mr.DownMaxRSS, mr.DownSamples = down.stop()
	mr.DownPeakRSS, _, _ = p.memory()
	mr.Refused = rc.refused.Load()
	r.progress("memory (%s): %.0f events read, %.0f queued, %d rows, slot lag %.0f bytes; spilled / loaded in the last %s: %.0f / %.0f; RSS max %.1f MiB, VmHWM %.1f MiB",
		policy, mr.HeldRead, mr.HeldQueue, mr.HeldRows, mr.HeldLagBytes, r.cfg.Faults.MemorySettle, mr.HoldSpilled, mr.HoldLoaded, mib(mr.DownMaxRSS), mib(mr.DownPeakRSS))

	r.progress("memory (%s): receiver back; timing the drain", policy)
	drain := sampleRSS(p, 100*time.Millisecond)
	back := time.Now()
	rc.down.Store(false)
	if refuse {
		if err := rc.listenAgain(); err != nil {
			drain.stop()
			return mr, err
		}
	}
	err = waitDistinct(ctx, tl, n, timeout, p.exited)
	mr.ReceivedSecs = time.Since(back).Seconds()
	if err == nil {
		err = waitSettled(ctx, db.pool, n, timeout, p.exited)
	}
	mr.DrainSecs = time.Since(back).Seconds()
	mr.DrainMaxRSS, _ = drain.stop()
	mr.PeakRSS, _, _ = p.memory()
	if m, serr := p.scrape(ctx); serr == nil {
		mr.Spilled, mr.Loaded = m["outbox_relay_spilled_total"], m["outbox_relay_loaded_total"]
	}
	mr.count(tl)
	if err != nil {
		return mr, err
	}
	mr.Rows, err = countRows(ctx, db.pool)
	mr.Load.End = loadAvg()
	r.progress("memory (%s): drained in %.1fs; peak RSS %.1f MiB; spilled %.0f, loaded %.0f", policy, mr.DrainSecs, mib(mr.PeakRSS), mr.Spilled, mr.Loaded)
	return mr, err
}

// attemptErrors counts relay.attempts rows by error_class.
func attemptErrors(ctx context.Context, pool *pgxpool.Pool) (map[string]int, error) {
	rows, err := pool.Query(ctx, `SELECT coalesce(error_class, ''), count(*) FROM relay.attempts GROUP BY 1`)
	if err != nil {
		return nil, fmt.Errorf("count attempt errors: %w", err)
	}
	out := map[string]int{}
	var class string
	var n int
	_, err = pgx.ForEachRow(rows, []any{&class, &n}, func() error { out[class] = n; return nil })
	if err != nil {
		return nil, fmt.Errorf("count attempt errors: %w", err)
	}
	return out, nil
}
