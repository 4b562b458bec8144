package bench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The fault phases (recovery, takeover, ratelimit, memory) are opt-in.
// Each runs in a database of its own in the bench's cluster, with its own
// slot (so one phase's backlog or held WAL never reaches another's relay),
// its own receivers and its own relay processes; the database is dropped
// when the phase ends. The relay of the default phases is stopped before
// the first of them, so it does not decode their WAL on the same cores.
const (
	PhaseRecovery  = "recovery"  // SIGKILL the relay under a steady producer, restart it, time to first delivery
	PhaseTakeover  = "takeover"  // SIGKILL the active relay with a standby on the slot, time to the standby's first delivery
	PhaseRateLimit = "ratelimit" // an endpoint and a tenant rate limit, measured at the receiver
	PhaseMemory    = "memory"    // RSS with the receiver down and a large backlog, under spill and block
)

// FaultPhases are the fault phases, in the order Run runs them.
var FaultPhases = []string{PhaseRecovery, PhaseTakeover, PhaseRateLimit, PhaseMemory}

// FaultConfig configures the fault phases. Zero values take the documented
// defaults.
type FaultConfig struct {
	// Rate is the steady producer's events per second during the recovery
	// and takeover phases (single-row autocommit INSERTs on
	// Config.Producers connections). Default 500.
	Rate int
	// Kills is how many times the recovery phase kills and restarts the
	// relay. Default 5.
	Kills int
	// Takeovers is how many times the takeover phase kills the active
	// relay (a fresh standby is started after each). Default 3.
	Takeovers int
	// KillEvery is how long the relay delivers between one restart's (or
	// takeover's) first new delivery and the next kill; a uniform random
	// 0–1 s is added each time, so a kill falls at a random point of a
	// standby's 1 s poll. Default 3s.
	KillEvery time.Duration
	// RestartTimeout bounds the wait for the first delivery after a kill.
	// Default 60s.
	RestartTimeout time.Duration

	// RateDuration is the ratelimit phase's measuring window. Default 30s.
	RateDuration time.Duration
	// EndpointRate is endpoint L's rate_limit in deliveries per second
	// (rate_burst left NULL: the bucket holds max(1, ceil(rate))). Default 200.
	EndpointRate int
	// TenantRate is the tenant's rate_limit over its two endpoints
	// (rate_burst NULL, likewise). Default 300.
	TenantRate int
	// UnthrottledBacklog is the backlog of the unthrottled endpoint U that
	// drains while L is measured. Default 16,000 per second of
	// RateDuration + 1 s.
	UnthrottledBacklog int

	// MemoryEvents is the memory phase's backlog per policy. Default 1,000,000.
	MemoryEvents int
	// MemoryPolicies are the --overflow policies the memory phase runs, in
	// order. Default spill, block.
	MemoryPolicies []string
	// MemorySettle is how long the memory phase keeps the receiver down
	// after the relay has settled (spill: every event read and
	// acknowledged; block: nothing read for a second after the inserts).
	// Default 5s.
	MemorySettle time.Duration
	// MemoryDown is how the memory phase's receiver is down: "refuse"
	// (nothing listens: every connection attempt is refused; the default)
	// or "503" (it accepts connections and answers 503 to every request).
	MemoryDown string
}

func (c FaultConfig) withDefaults() FaultConfig {
	c.Rate = cmp.Or(c.Rate, 500)
	c.Kills = cmp.Or(c.Kills, 5)
	c.Takeovers = cmp.Or(c.Takeovers, 3)
	c.KillEvery = cmp.Or(c.KillEvery, 3*time.Second)
	c.RestartTimeout = cmp.Or(c.RestartTimeout, time.Minute)
	c.RateDuration = cmp.Or(c.RateDuration, 30*time.Second)
	c.EndpointRate = cmp.Or(c.EndpointRate, 200)
	c.TenantRate = cmp.Or(c.TenantRate, 300)
	c.UnthrottledBacklog = cmp.Or(c.UnthrottledBacklog, int(16_000*(c.RateDuration+time.Second).Seconds()))
	c.MemoryEvents = cmp.Or(c.MemoryEvents, 1_000_000)
	if len(c.MemoryPolicies) == 0 {
		c.MemoryPolicies = []string{"spill", "block"}
	}
	c.MemorySettle = cmp.Or(c.MemorySettle, 5*time.Second)
	c.MemoryDown = cmp.Or(c.MemoryDown, MemoryDownRefuse)
	return c
}

func (c FaultConfig) validate() error {
	var errs []error
	for name, v := range map[string]int{"Faults.Rate": c.Rate, "Faults.Kills": c.Kills, "Faults.Takeovers": c.Takeovers,
		"Faults.EndpointRate": c.EndpointRate, "Faults.TenantRate": c.TenantRate, "Faults.UnthrottledBacklog": c.UnthrottledBacklog,
		"Faults.MemoryEvents": c.MemoryEvents} {
		if v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %d)", name, v))
		}
	}
	for name, d := range map[string]time.Duration{"Faults.KillEvery": c.KillEvery, "Faults.RestartTimeout": c.RestartTimeout,
		"Faults.RateDuration": c.RateDuration, "Faults.MemorySettle": c.MemorySettle} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %s)", name, d))
		}
	}
	if c.RateDuration != 0 && c.RateDuration < time.Second {
		errs = append(errs, fmt.Errorf("Faults.RateDuration must be at least 1s (got %s)", c.RateDuration))
	}
	for _, p := range c.MemoryPolicies {
		if p != "spill" && p != "block" {
			errs = append(errs, fmt.Errorf("Faults.MemoryPolicies: %q is not spill or block", p))
		}
	}
	if c.MemoryDown != "" && c.MemoryDown != MemoryDownRefuse && c.MemoryDown != MemoryDown503 {
		errs = append(errs, fmt.Errorf("Faults.MemoryDown: %q is not %s or %s", c.MemoryDown, MemoryDownRefuse, MemoryDown503))
	}
	return errors.Join(errs...)
}

// The memory phase's ways of being down (FaultConfig.MemoryDown).
const (
	MemoryDownRefuse = "refuse"
	MemoryDown503    = "503"
)

// Tags of the fault phases' event ids (0xbe000010 to 0xbe00001f).
const (
	tagRecovery    uint32 = 0xbe000010
	tagTakeover    uint32 = 0xbe000011
	tagRateL       uint32 = 0xbe000012
	tagRateU       uint32 = 0xbe000013
	tagRateT1      uint32 = 0xbe000014
	tagRateT2      uint32 = 0xbe000015
	tagMemorySpill uint32 = 0xbe000016
	tagMemoryBlock uint32 = 0xbe000017
)

// phaseDB is a migrated database with its own slot, for one fault phase.
type phaseDB struct {
	name, url, slot string
	pool            *pgxpool.Pool
}

// newPhaseDB creates database bench_<name> with slot bench_<name> (slot
// names are cluster-wide), applies the schema and creates the slot with
// the real binary's migrate.
func (r *run) newPhaseDB(ctx context.Context, name string) (*phaseDB, error) {
	if err := r.stopMainRelay(); err != nil {
		return nil, err
	}
	name = "bench_" + strings.ReplaceAll(name, "-", "_")
	db := &phaseDB{name: name, slot: name}
	var err error
	if db.url, err = r.cluster.CreateDatabase(ctx, name); err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, r.cfg.RelayExe, "migrate", "--database-url", db.url, "--slot", db.slot).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("outbox-relay migrate %s: %v\n%s", name, err, out)
	}
	if db.pool, err = pgxpool.New(ctx, db.url); err != nil {
		return nil, err
	}
	return db, nil
}

// dropPhaseDB closes the pool and drops the database and its slot.
func (r *run) dropPhaseDB(db *phaseDB) {
	db.pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := r.cluster.DropDatabase(ctx, db.name); err != nil {
		r.progress("warning: %v", err)
	}
}

// stopMainRelay stops the default phases' relay (recording its peak RSS)
// so it does not decode the fault phases' WAL.
func (r *run) stopMainRelay() error {
	if r.relay == nil {
		return nil
	}
	if err := r.relay.exited(); err != nil {
		return err
	}
	r.res.RelayPeakRSS, _, _ = r.relay.memory()
	r.progress("stopping the relay of the default phases before the fault phases")
	r.relay.stop(30 * time.Second)
	r.relay = nil
	return nil
}

// startPhaseRelay starts `run` against db as a child process. Flag order:
// the bench's defaults, then Config.RelayArgs, then the phase's own (so a
// phase's --overflow wins). Config.RelayPrefix is not used: a relay killed
// with SIGKILL writes no profile, and several would share one file.
func (r *run) startPhaseRelay(db *phaseDB, extra ...string) (*relayProc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	args := []string{"run", "--database-url", db.url, "--slot", db.slot, "--allow-networks", "127.0.0.0/8",
		"--workers", fmt.Sprint(r.cfg.Workers), "--http-addr", addr, "--log-level", "warn"}
	args = append(args, r.cfg.RelayArgs...)
	args = append(args, extra...)
	p, err := startRelay(r.cfg.RelayExe, args)
	if err != nil {
		return nil, err
	}
	p.opsAddr = addr
	return p, nil
}

// kill9 sends SIGKILL and waits until the process is reaped; it returns
// when the signal was sent and when the process was seen dead.
func (p *relayProc) kill9() (sent, dead time.Time) {
	sent = time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
	return sent, time.Now()
}

// readyz returns the relay's /readyz status and body ("" when unreachable).
func (p *relayProc) readyz(ctx context.Context) (int, string) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.opsAddr+"/readyz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		b.WriteString(sc.Text())
	}
	return resp.StatusCode, b.String()
}

// waitReady waits until /readyz answers 200 with a body starting with want
// ("streaming" or "standby").
func (p *relayProc) waitReady(ctx context.Context, want string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := p.exited(); err != nil {
			return err
		}
		code, body := p.readyz(ctx)
		if code == http.StatusOK && strings.HasPrefix(body, want) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("relay not %s after %s (readyz %d %q)", want, timeout, code, body)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// scrape reads every unlabelled sample from the relay's /metrics.
func (p *relayProc) scrape(ctx context.Context) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.opsAddr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape relay metrics: %w", err)
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || strings.Contains(line, "{") {
			continue
		}
		name, v, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
			m[name] = f
		}
	}
	return m, sc.Err()
}

// rssSampler reads a process's VmRSS every interval until stopped.
type rssSampler struct {
	stopc   chan struct{}
	done    chan struct{}
	max     int64
	samples int
}

func sampleRSS(p *relayProc, every time.Duration) *rssSampler {
	s := &rssSampler{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if _, cur, err := p.memory(); err == nil {
				s.max = max(s.max, cur)
				s.samples++
			}
			select {
			case <-s.stopc:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends the sampling and returns the largest VmRSS seen and how many
// samples were read.
func (s *rssSampler) stop() (maxRSS int64, samples int) {
	close(s.stopc)
	<-s.done
	return s.max, s.samples
}

// connAccepted is the context key of a connection's accept time (Unix ns).
type connAccepted struct{}

// faultReceiver is a loopback receiver for the fault phases. It counts
// deliveries in a tally like receiver does, and also: the time of every
// delivery (if keepTimes), each event's first arrival, whether a repeated
// delivery is explained by a kill, and the first delivery after a mark
// that came over a connection accepted after the mark (so it was sent by a
// process started, or a standby that took over, after the kill). While
// down, it answers 503 and counts nothing but the refusal.
type faultReceiver struct {
	srvMu sync.Mutex
	srv   *http.Server // nil while not listening (stopListening)
	addr  string
	url   string
	tl    *tally
	bufs  sync.Pool

	down    atomic.Bool
	refused atomic.Int64 // 503 answers while down

	first []atomic.Int64 // per seq: Unix ns of the first 2xx delivery

	mark     atomic.Int64 // Unix ns; 0 = no mark
	firstAny atomic.Int64 // first delivery after mark on a connection accepted after it
	firstNew atomic.Int64 // same, of an event whose INSERT began after mark

	mu          sync.Mutex
	kills       []kill
	unexplained int64 // repeated deliveries with no kill between them
	keepTimes   bool
	times       []int64
}

// kill is when a SIGKILL was sent and when the process was seen dead.
type kill struct{ sent, dead time.Time }

// startFaultReceiver serves tl. n bounds the sequence numbers (tl.n).
func startFaultReceiver(tl *tally, keepTimes bool) (*faultReceiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rc := &faultReceiver{addr: ln.Addr().String(), url: "http://" + ln.Addr().String() + "/hook", tl: tl,
		first: make([]atomic.Int64, tl.n), keepTimes: keepTimes}
	rc.bufs.New = func() any { b := make([]byte, 0, 4096); return &b }
	rc.serve(ln)
	return rc, nil
}

func (rc *faultReceiver) serve(ln net.Listener) {
	srv := &http.Server{Handler: rc, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute,
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
			return context.WithValue(ctx, connAccepted{}, time.Now().UnixNano())
		}}
	rc.srvMu.Lock()
	rc.srv = srv
	rc.srvMu.Unlock()
	go srv.Serve(ln) //nolint:errcheck // ends with Close
}

// stopListening closes the listener and every connection: from now on a
// connection attempt is refused, as by a receiver that is down.
func (rc *faultReceiver) stopListening() {
	rc.srvMu.Lock()
	srv := rc.srv
	rc.srv = nil
	rc.srvMu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// listenAgain serves on the same address again.
func (rc *faultReceiver) listenAgain() error {
	ln, err := net.Listen("tcp", rc.addr)
	if err != nil {
		return fmt.Errorf("receiver: listen on %s again: %w", rc.addr, err)
	}
	rc.serve(ln)
	return nil
}

func (rc *faultReceiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	now := time.Now()
	bp := rc.bufs.Get().(*[]byte)
	defer rc.bufs.Put(bp)
	body, err := readAll(req.Body, (*bp)[:0])
	*bp = body
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	if rc.down.Load() {
		rc.refused.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	ns := now.UnixNano()
	rc.tl.record(req.Header, body, now)
	if seq, ok := rc.tl.seq(req.Header.Get("Webhook-Id")); ok {
		if prev := rc.first[seq].Load(); prev != 0 || !rc.first[seq].CompareAndSwap(0, ns) {
			rc.repeat(time.Unix(0, rc.first[seq].Load()), now)
		}
	}
	if mark := rc.mark.Load(); mark != 0 {
		if at, _ := req.Context().Value(connAccepted{}).(int64); at > mark {
			rc.setFirst(&rc.firstAny, mark, ns)
			if t, ok := bodyTime(body); ok && t > mark {
				rc.setFirst(&rc.firstNew, mark, ns)
			}
		}
	}
	if rc.keepTimes {
		rc.mu.Lock()
		rc.times = append(rc.times, ns)
		rc.mu.Unlock()
	}
	w.WriteHeader(http.StatusNoContent)
}

// repeat classifies a repeated delivery: explained when a kill falls
// between the first delivery and this one. A request the dead process
// sent can be handled a little after it is seen dead, hence the slack
// (as in e2e's repeatsWithoutKill).
func (rc *faultReceiver) repeat(first, now time.Time) {
	const slack = 500 * time.Millisecond
	rc.mu.Lock()
	defer rc.mu.Unlock()
	for _, k := range rc.kills {
		if first.Before(k.dead.Add(slack)) && k.sent.Before(now) {
			return
		}
	}
	rc.unexplained++
}

// setFirst records ns in first if it is unset or later, as a delivery
// after mark: handlers read their arrival time before they get here, so
// two concurrent ones can arrive out of order. If arm moved the mark
// meanwhile, this delivery belongs to the previous kill (it read the old
// mark), so it is taken back; arm stores the new mark before clearing
// first, so one of the two always wins.
func (rc *faultReceiver) setFirst(first *atomic.Int64, mark, ns int64) {
	for {
		cur := first.Load()
		if cur != 0 && cur <= ns {
			return
		}
		if first.CompareAndSwap(cur, ns) {
			break
		}
	}
	if rc.mark.Load() != mark {
		first.CompareAndSwap(ns, 0)
	}
}

// arm starts watching for the first delivery after t (a kill about to be
// sent). The mark moves first, then the previous kill's figures are
// cleared (see setFirst).
func (rc *faultReceiver) arm(t time.Time) {
	rc.mark.Store(t.UnixNano())
	rc.firstAny.Store(0)
	rc.firstNew.Store(0)
}

// addKill records a kill, for classifying repeated deliveries.
func (rc *faultReceiver) addKill(k kill) {
	rc.mu.Lock()
	rc.kills = append(rc.kills, k)
	rc.mu.Unlock()
}

// waitFirst waits until a delivery after the mark has come over a new
// connection, of an event committed after the mark when newEvent, and
// returns its arrival time.
func (rc *faultReceiver) waitFirst(ctx context.Context, newEvent bool, timeout time.Duration, alive func() error) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		v := rc.firstAny.Load()
		if newEvent {
			v = rc.firstNew.Load()
		}
		if v != 0 {
			return time.Unix(0, v), nil
		}
		if alive != nil {
			if err := alive(); err != nil {
				return time.Time{}, err
			}
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("no delivery within %s of the kill", timeout)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// arrivals returns the recorded delivery times (keepTimes), sorted.
func (rc *faultReceiver) arrivals() []int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	out := slices.Clone(rc.times)
	slices.Sort(out)
	return out
}

func (rc *faultReceiver) unexplainedRepeats() int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.unexplained
}

func (rc *faultReceiver) close() {
	rc.srvMu.Lock()
	srv := rc.srv
	rc.srvMu.Unlock()
	if srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if srv.Shutdown(ctx) != nil {
		srv.Close()
	}
}

// waitDistinct waits until the tally has n distinct events, alive fails,
// ctx ends or timeout passes.
func waitDistinct(ctx context.Context, tl *tally, n int, timeout time.Duration, alive func() error) error {
	deadline := time.Now().Add(timeout)
	for tl.distinct.Load() < int64(n) {
		if alive != nil {
			if err := alive(); err != nil {
				return err
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s: %d of %d events arrived", timeout, tl.distinct.Load(), n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// producer commits single-row events at a steady rate until stopped.
type producer struct {
	cancel context.CancelFunc
	done   chan struct{}
	sent   int
	rate   float64
	err    error
}

// startProducer runs insert ($1 id, $2 body, clock read just before the
// INSERT) at rate per second on conns connections, for at most max
// events. The INSERTs run on ctx, not on the producer's own context, so
// stopping never cancels a statement half-way (its outcome would be
// unknown).
func startProducer(ctx context.Context, pool *pgxpool.Pool, insert string, tag uint32, rate, conns, maxEvents, size int) *producer {
	pctx, cancel := context.WithCancel(ctx)
	p := &producer{cancel: cancel, done: make(chan struct{})}
	bufs := make(chan []byte, conns)
	for range conns {
		bufs <- nil
	}
	d := time.Duration(float64(maxEvents) / float64(rate) * float64(time.Second))
	go func() {
		defer close(p.done)
		p.sent, p.rate, p.err = paced(pctx, rate, d, conns, func(seq int) error {
			buf := <-bufs
			defer func() { bufs <- buf }()
			buf = appendBody(buf[:0], seq, time.Now().UnixNano(), size)
			_, err := pool.Exec(ctx, insert, eventID(tag, seq), buf)
			return err
		})
		if errors.Is(p.err, context.Canceled) && ctx.Err() == nil {
			p.err = nil // stopped
		}
	}()
	return p
}

// stop stops the producer and returns how many events it committed.
func (p *producer) stop() (int, float64, error) {
	p.cancel()
	<-p.done
	return p.sent, p.rate, p.err
}

// failed returns the producer's error if it has stopped on one.
func (p *producer) failed() error {
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("producer: %w", p.err)
		}
		return errors.New("producer stopped early")
	default:
		return nil
	}
}

// Rows is the accounting of a fault phase's database: every event in
// relay.outbox should have exactly one relay.deliveries row, succeeded.
type Rows struct {
	Events    int `json:"events_in_outbox"`
	Rows      int `json:"rows"`
	Succeeded int `json:"succeeded"`
	NoRow     int `json:"events_without_row"`
	Repeated  int `json:"events_with_several_rows"`
}

// Exact reports whether every event has exactly one row and it is succeeded.
func (rw Rows) Exact() bool {
	return rw.Rows == rw.Events && rw.Succeeded == rw.Events && rw.NoRow == 0 && rw.Repeated == 0
}

func countRows(ctx context.Context, pool *pgxpool.Pool) (Rows, error) {
	var rw Rows
	err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM relay.outbox),
  (SELECT count(*) FROM relay.deliveries),
  (SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'),
  (SELECT count(*) FROM relay.outbox o WHERE NOT EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.event_id = o.id)),
  (SELECT count(*) FROM (SELECT 1 FROM relay.deliveries GROUP BY event_id HAVING count(*) > 1) x)`).
		Scan(&rw.Events, &rw.Rows, &rw.Succeeded, &rw.NoRow, &rw.Repeated)
	if err != nil {
		return rw, fmt.Errorf("count delivery rows: %w", err)
	}
	return rw, nil
}

// waitSettled waits until no delivery row of the database is in a state
// other than succeeded and n rows are succeeded. The poll uses the
// (endpoint_id, state) index, so it stays cheap on a million rows.
func waitSettled(ctx context.Context, pool *pgxpool.Pool, n int, timeout time.Duration, alive func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		var open int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM relay.deliveries WHERE state IN ('pending', 'retrying', 'failed', 'dead', 'rejected', 'unrouted')`).Scan(&open)
		if err != nil {
			return fmt.Errorf("count open delivery rows: %w", err)
		}
		if open == 0 {
			var ok int
			if err := pool.QueryRow(ctx, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`).Scan(&ok); err != nil {
				return fmt.Errorf("count succeeded rows: %w", err)
			}
			if ok >= n {
				return nil
			}
		}
		if alive != nil {
			if err := alive(); err != nil {
				return err
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s: %d delivery rows not succeeded", timeout, open)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// copyEvents inserts n events (seq from..from+n-1 of tag) for one tenant's
// endpoint with COPY, in txnRows-row transactions.
func copyEvents(ctx context.Context, pool *pgxpool.Pool, tag uint32, from, n, txnRows, size int, tenant, endpoint string) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	cols := []string{"id", "tenant_id", "event_type", "payload", "endpoint_id"}
	bodies := make([][]byte, txnRows)
	for at := from; at < from+n; at += txnRows {
		m := min(txnRows, from+n-at)
		now := time.Now().UnixNano()
		for i := range m {
			bodies[i] = appendBody(bodies[i][:0], at+i, now, size)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			_, err := tx.CopyFrom(ctx, pgx.Identifier{"relay", "outbox"}, cols, pgx.CopyFromSlice(m, func(i int) ([]any, error) {
				return []any{eventID(tag, at+i), tenant, "bench.event", bodies[i], endpoint}, nil
			}))
			return err
		})
		if err != nil {
			return fmt.Errorf("insert events: %w", err)
		}
	}
	return nil
}

// addEndpoint registers an endpoint; extra is "col = value" SQL for the
// optional columns, e.g. "rate_limit = 200".
func addEndpoint(ctx context.Context, pool *pgxpool.Pool, id, tenant, url, secret, extra string) error {
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ($1, $2, $3, ARRAY[$4])`, id, tenant, url, secret); err != nil {
		return fmt.Errorf("register endpoint %s: %w", id, err)
	}
	if extra != "" {
		if _, err := pool.Exec(ctx, `UPDATE relay.endpoints SET `+extra+` WHERE id = $1`, id); err != nil {
			return fmt.Errorf("configure endpoint %s: %w", id, err)
		}
	}
	return nil
}

// Spread is the median, minimum and maximum of a few measurements, in ms.
type Spread struct {
	Median float64 `json:"median_ms"`
	Min    float64 `json:"min_ms"`
	Max    float64 `json:"max_ms"`
}

func spreadOf(ms []float64) Spread {
	if len(ms) == 0 {
		return Spread{}
	}
	s := slices.Clone(ms)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Spread{Median: med, Min: s[0], Max: s[len(s)-1]}
}

func msSince(from, to time.Time) float64 { return float64(to.Sub(from)) / float64(time.Millisecond) }

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// Load is the machine's 1-minute load average at a phase's start and
// end, from /proc/loadavg (-1 if unreadable): the fault phases' timings
// are only as quiet as the machine.
type Load struct {
	Start float64 `json:"start"`
	End   float64 `json:"end"`
}

func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}
