package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

// The recovery and takeover phases (issue 6): a steady producer commits
// single-row events while the relay is killed with SIGKILL.
//
//   - recovery: one relay; after each kill a new one is started at once.
//   - takeover: an active relay and a standby on the same slot; after each
//     kill the standby takes over and a fresh standby is started.
//
// Each kill is timed to the first delivery the receiver gets over a
// connection it accepted after the kill (so from the new process, not a
// request of the dead one still in a socket buffer), and to the first such
// delivery of an event whose INSERT began after the kill (so committed
// after it). At the end the producer stops, every committed event must
// reach the receiver and have exactly one succeeded row; repeated
// deliveries are counted, and those with no kill between the two
// deliveries are reported apart (the relay promises duplicates only for
// deliveries in flight at a crash).

// Kill is one kill's timings, in ms from the moment SIGKILL was sent.
type Kill struct {
	ReapedMS         float64 `json:"kill_to_reaped_ms"`
	RestartToFirstMS float64 `json:"restart_to_first_delivery_ms,omitempty"` // recovery: exec of the new relay to its first delivery
	StreamingMS      float64 `json:"kill_to_streaming_ms"`                   // /readyz of the new (or standby) relay says streaming; polled every 10 ms
	FirstMS          float64 `json:"kill_to_first_delivery_ms"`
	FirstNewMS       float64 `json:"kill_to_first_new_event_ms"`
}

// Faulted is the recovery or takeover phase's figures.
type Faulted struct {
	Rate          int     `json:"producer_rate"`
	AchievedRate  float64 `json:"achieved_rate"`
	KillEverySecs float64 `json:"kill_every_s"`
	Kills         []Kill  `json:"kills"`
	First         Spread  `json:"kill_to_first_delivery"`
	FirstNew      Spread  `json:"kill_to_first_new_event"`
	Streaming     Spread  `json:"kill_to_streaming"`
	// RestartToFirst is recovery only.
	RestartToFirst *Spread `json:"restart_to_first_delivery,omitempty"`
	Counts
	Committed   int   `json:"committed"`
	Unexplained int64 `json:"duplicates_without_kill"`
	Rows        Rows  `json:"rows"`
	Load        Load  `json:"load_avg_1m"`
	// TargetMS is issue 6's restart-to-first-delivery bound (recovery);
	// 0 for takeover, which has none.
	TargetMS float64 `json:"target_ms,omitempty"`
}

// TargetRecovery: restart to first delivery within 2 s (issue 6).
const TargetRecovery = 2 * time.Second

// Clean reports whether every committed event arrived intact with exactly
// one succeeded row, and every repeated delivery had a kill between.
func (f *Faulted) Clean() bool {
	return f.Missing == 0 && f.Unexpected == 0 && f.BadBodies == 0 && f.BadSigs == 0 && f.Unexplained == 0 && f.Rows.Exact()
}

// Met reports whether every kill's first delivery came within the target.
func (f *Faulted) Met() bool { return f.TargetMS > 0 && f.First.Max <= f.TargetMS }

func (f *Faulted) summarize() {
	var first, fresh, streaming, restart []float64
	for _, k := range f.Kills {
		first = append(first, k.FirstMS)
		fresh = append(fresh, k.FirstNewMS)
		streaming = append(streaming, k.StreamingMS)
		if k.RestartToFirstMS > 0 {
			restart = append(restart, k.RestartToFirstMS)
		}
	}
	f.First, f.FirstNew, f.Streaming = spreadOf(first), spreadOf(fresh), spreadOf(streaming)
	if len(restart) > 0 {
		s := spreadOf(restart)
		f.RestartToFirst = &s
	}
}

// watchStreaming polls p's /readyz every 10 ms until it says streaming and
// returns a function giving the time it first did (zero if not yet).
func watchStreaming(ctx context.Context, p *relayProc) (when func() time.Time, stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var at atomic.Int64
	go func() {
		for ctx.Err() == nil {
			if code, body := p.readyz(ctx); code == http.StatusOK && body == "streaming" {
				at.Store(time.Now().UnixNano())
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return func() time.Time {
		if v := at.Load(); v != 0 {
			return time.Unix(0, v)
		}
		return time.Time{}
	}, cancel
}

// faultSetup is what both phases share: a database, a receiver and the
// endpoint.
type faultSetup struct {
	db  *phaseDB
	tl  *tally
	rc  *faultReceiver
	cap int
}

func (r *run) faultSetup(ctx context.Context, name string, tag uint32, kills int) (*faultSetup, error) {
	fc := r.cfg.Faults
	db, err := r.newPhaseDB(ctx, name)
	if err != nil {
		return nil, err
	}
	// Enough sequence numbers for every kill taking its whole timeout.
	capacity := int(float64(fc.Rate) * (float64(kills+2)*(fc.KillEvery+fc.RestartTimeout).Seconds() + 60))
	s := &faultSetup{db: db, cap: capacity, tl: newTally(tag, capacity, r.cfg.BodyBytes, false, r.verifier())}
	if s.rc, err = startFaultReceiver(s.tl, false); err != nil {
		r.dropPhaseDB(db)
		return nil, err
	}
	if err := addEndpoint(ctx, db.pool, "ep_"+name, name, s.rc.url, r.secretText, ""); err != nil {
		s.close(r)
		return nil, err
	}
	return s, nil
}

func (s *faultSetup) close(r *run) {
	s.rc.close()
	r.dropPhaseDB(s.db)
}

func (s *faultSetup) insert(name string) string {
	return fmt.Sprintf(`INSERT INTO relay.outbox (id, tenant_id, event_type, payload) VALUES ($1, '%s', 'bench.event', $2)`, name)
}

// jitter is a uniform random 0–1 s, added to the time between kills so a
// kill does not fall at the same point of a standby's 1 s poll every time.
// timeKill times what follows a SIGKILL sent at sent (its process reaped
// at dead) while p takes over: the first delivery on a new connection, the
// first of an event committed after the kill, and p's /readyz saying
// streaming. It returns the figures and the first delivery's time.
func (s *faultSetup) timeKill(ctx context.Context, p *relayProc, sent, dead time.Time, timeout time.Duration, alive func() error) (Kill, time.Time, error) {
	streaming, stopWatch := watchStreaming(ctx, p)
	defer stopWatch()
	first, err := s.rc.waitFirst(ctx, false, timeout, alive)
	if err != nil {
		return Kill{}, first, err
	}
	fresh, err := s.rc.waitFirst(ctx, true, timeout, alive)
	if err != nil {
		return Kill{}, first, err
	}
	// Read the first delivery again: a handler that arrived earlier than
	// the one seen above may have recorded itself since (setFirst keeps
	// the earliest), and the new event's handler recorded itself as a
	// delivery before as a new event, so now first <= fresh.
	if first, err = s.rc.waitFirst(ctx, false, timeout, alive); err != nil {
		return Kill{}, first, err
	}
	// /readyz may lag the first delivery by its 10 ms poll.
	deadline := time.Now().Add(time.Second)
	for streaming().IsZero() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	k := Kill{ReapedMS: msSince(sent, dead), FirstMS: msSince(sent, first), FirstNewMS: msSince(sent, fresh)}
	if st := streaming(); !st.IsZero() {
		k.StreamingMS = msSince(sent, st)
	}
	return k, first, nil
}

func jitter() time.Duration { return rand.N(time.Second) }

// pause waits d while the producer and the relays stay healthy.
func pause(ctx context.Context, d time.Duration, alive func() error) error {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if err := alive(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(50*time.Millisecond, time.Until(end))):
		}
	}
	return alive()
}

// finish stops the producer, waits for every committed event to arrive
// and settle, and fills f's accounting.
func (r *run) finishFaulted(ctx context.Context, s *faultSetup, prod *producer, f *Faulted, alive func() error) error {
	sent, rate, err := prod.stop()
	if err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	f.AchievedRate = rate
	var committed int
	if err := s.db.pool.QueryRow(ctx, `SELECT count(*) FROM relay.outbox`).Scan(&committed); err != nil {
		return err
	}
	if committed != sent {
		r.progress("warning: producer counted %d commits, relay.outbox holds %d", sent, committed)
	}
	f.Committed = committed
	r.progress("%d events committed; waiting for every one to be delivered and recorded", committed)
	werr := waitDistinct(ctx, s.tl, committed, r.cfg.Timeout, alive)
	if werr == nil {
		werr = waitSettled(ctx, s.db.pool, committed, r.cfg.Timeout, alive)
	}
	f.count(s.tl)
	f.Missing = int64(committed) - f.Distinct
	f.Unexplained = s.rc.unexplainedRepeats()
	rows, err := countRows(ctx, s.db.pool)
	if err != nil {
		return err
	}
	f.Rows = rows
	f.summarize()
	f.Load.End = loadAvg()
	return werr
}

// recovery kills the relay Kills times under a steady producer,
// restarting it at once each time.
func (r *run) recovery(ctx context.Context) error {
	fc := r.cfg.Faults
	s, err := r.faultSetup(ctx, "recovery", tagRecovery, fc.Kills)
	if err != nil {
		return err
	}
	defer s.close(r)
	p, err := r.startPhaseRelay(s.db)
	if err != nil {
		return err
	}
	defer func() { p.stop(30 * time.Second) }()
	if err := p.waitReady(ctx, "streaming", time.Minute); err != nil {
		return err
	}
	f := &Faulted{Rate: fc.Rate, KillEverySecs: fc.KillEvery.Seconds(), TargetMS: ms(TargetRecovery), Load: Load{Start: loadAvg()}}
	r.res.Recovery = f
	r.progress("recovery: producer at %d/s; %d kills (SIGKILL, then a new relay at once), %s apart", fc.Rate, fc.Kills, fc.KillEvery)
	prod := startProducer(ctx, s.db.pool, s.insert("recovery"), tagRecovery, fc.Rate, r.cfg.Producers, s.cap, r.cfg.BodyBytes)
	alive := func() error { return errors.Join(prod.failed(), p.exited()) }
	if err := waitDistinct(ctx, s.tl, 1, time.Minute, alive); err != nil {
		prod.stop() //nolint:errcheck // the phase failed already
		return fmt.Errorf("first delivery: %w", err)
	}
	for i := range fc.Kills {
		if err := pause(ctx, fc.KillEvery+jitter(), alive); err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return err
		}
		sent := time.Now()
		s.rc.arm(sent)
		_, dead := p.kill9()
		s.rc.addKill(kill{sent: sent, dead: dead})
		restarted := time.Now()
		if p, err = r.startPhaseRelay(s.db); err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return err
		}
		k, first, err := s.timeKill(ctx, p, sent, dead, fc.RestartTimeout, alive)
		if err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return fmt.Errorf("kill %d: %w", i+1, err)
		}
		k.RestartToFirstMS = msSince(restarted, first)
		f.Kills = append(f.Kills, k)
		r.progress("recovery: kill %d: first delivery %.0f ms after SIGKILL (%.0f ms after the restart), first new event %.0f ms", i+1, k.FirstMS, k.RestartToFirstMS, k.FirstNewMS)
	}
	if err := pause(ctx, fc.KillEvery, alive); err != nil {
		prod.stop() //nolint:errcheck // the phase failed already
		return err
	}
	return r.finishFaulted(ctx, s, prod, f, p.exited)
}

// takeover kills the active relay Takeovers times with a standby on the
// slot, starting a fresh standby after each takeover.
func (r *run) takeover(ctx context.Context) error {
	fc := r.cfg.Faults
	s, err := r.faultSetup(ctx, "takeover", tagTakeover, fc.Takeovers)
	if err != nil {
		return err
	}
	defer s.close(r)
	var active, standby *relayProc
	defer func() {
		for _, p := range []*relayProc{active, standby} {
			if p != nil {
				p.stop(30 * time.Second)
			}
		}
	}()
	if active, err = r.startPhaseRelay(s.db); err != nil {
		return err
	}
	if err := active.waitReady(ctx, "streaming", time.Minute); err != nil {
		return err
	}
	newStandby := func() error {
		if standby, err = r.startPhaseRelay(s.db); err != nil {
			return err
		}
		return standby.waitReady(ctx, "standby", time.Minute)
	}
	if err := newStandby(); err != nil {
		return err
	}
	f := &Faulted{Rate: fc.Rate, KillEverySecs: fc.KillEvery.Seconds(), Load: Load{Start: loadAvg()}}
	r.res.Takeover = f
	r.progress("takeover: producer at %d/s; %d kills of the active relay with a standby waiting, %s apart", fc.Rate, fc.Takeovers, fc.KillEvery)
	prod := startProducer(ctx, s.db.pool, s.insert("takeover"), tagTakeover, fc.Rate, r.cfg.Producers, s.cap, r.cfg.BodyBytes)
	alive := func() error { return errors.Join(prod.failed(), active.exited(), standby.exited()) }
	if err := waitDistinct(ctx, s.tl, 1, time.Minute, alive); err != nil {
		prod.stop() //nolint:errcheck // the phase failed already
		return fmt.Errorf("first delivery: %w", err)
	}
	for i := range fc.Takeovers {
		if err := pause(ctx, fc.KillEvery+jitter(), alive); err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return err
		}
		if code, body := active.readyz(ctx); code != http.StatusOK || body != "streaming" {
			prod.stop() //nolint:errcheck // the phase failed already
			return fmt.Errorf("takeover %d: the active relay's /readyz says %d %q", i+1, code, body)
		}
		if code, body := standby.readyz(ctx); code != http.StatusOK || !strings.HasPrefix(body, "standby") {
			prod.stop() //nolint:errcheck // the phase failed already
			return fmt.Errorf("takeover %d: the standby's /readyz says %d %q", i+1, code, body)
		}
		sent := time.Now()
		s.rc.arm(sent)
		_, dead := active.kill9()
		s.rc.addKill(kill{sent: sent, dead: dead})
		active, standby = standby, nil
		aliveNow := func() error { return errors.Join(prod.failed(), active.exited()) }
		k, _, err := s.timeKill(ctx, active, sent, dead, fc.RestartTimeout, aliveNow)
		if err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return fmt.Errorf("takeover %d: %w", i+1, err)
		}
		f.Kills = append(f.Kills, k)
		r.progress("takeover %d: standby streaming %.0f ms after SIGKILL, first delivery %.0f ms, first new event %.0f ms", i+1, k.StreamingMS, k.FirstMS, k.FirstNewMS)
		if err := newStandby(); err != nil {
			prod.stop() //nolint:errcheck // the phase failed already
			return err
		}
	}
	if err := pause(ctx, fc.KillEvery, alive); err != nil {
		prod.stop() //nolint:errcheck // the phase failed already
		return err
	}
	return r.finishFaulted(ctx, s, prod, f, func() error { return errors.Join(active.exited(), standby.exited()) })
}
