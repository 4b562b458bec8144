package bench

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/signer"
)

// The phases Run can run, in the order it runs them.
const (
	PhaseBare        = "bare"         // bare HTTP client posts the backlog's bodies
	PhaseDrain       = "drain"        // the relay drains the backlog
	PhaseLatency     = "latency"      // steady producer, relay delivers
	PhaseBareLatency = "bare-latency" // steady direct POSTs, no database
	PhaseFairness    = "fairness"     // tenant B's latency with and without tenant A's slow backlog (relay)
	PhasePeerDrain   = "peer-drain"   // the polling peer (bench/pollrelay) drains the backlog
	PhasePeerLatency = "peer-latency" // steady producer, the polling peer delivers
	// PhaseDrainMany and PhasePeerDrainMany are in scale.go.
)

// AllPhases is the default.
var AllPhases = []string{PhaseBare, PhaseDrain, PhaseLatency, PhaseBareLatency, PhasePeerDrain, PhasePeerLatency}

// KnownPhases is every phase, in the order Run runs them. The fairness
// phase and the fault phases (faults.go) are opt-in: they take a minute
// and more.
var KnownPhases = append([]string{PhaseBare, PhaseDrain, PhaseDrainMany, PhaseLatency, PhaseBareLatency, PhaseFairness, PhasePeerDrain, PhasePeerDrainMany, PhasePeerLatency}, FaultPhases...)

// ParsePhases parses a comma-separated phase list.
func ParsePhases(s string) ([]string, error) {
	var out []string
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if p == "all" { // the default set; other phases may be added to it
			for _, q := range AllPhases {
				if !slices.Contains(out, q) {
					out = append(out, q)
				}
			}
			continue
		}
		if !slices.Contains(KnownPhases, p) {
			return nil, fmt.Errorf("unknown phase %q (want %s or all)", p, strings.Join(KnownPhases, ", "))
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no phase given")
	}
	return out, nil
}

// Config configures Run. Zero values take the documented defaults.
type Config struct {
	// RelayExe is the outbox-relay binary to run as a child process. Required
	// for the drain and latency phases.
	RelayExe string
	// RelayPrefix goes before "run" on the relay's command line, e.g. a
	// wrapper subcommand that profiles it. Default none.
	RelayPrefix []string
	// RelayArgs are extra flags for `run`, after the bench's own (so they
	// win). Default none.
	RelayArgs []string

	// Phases to run, among AllPhases. Default all.
	Phases []string
	// Events is the backlog size. Default 200,000. EventCounts, when
	// set, wins.
	Events int
	// EventCounts are backlog sizes: the backlog phases (bare, drain,
	// drain-many, peer-drain, peer-drain-many) run once per size, in the
	// order given. Default [Events].
	EventCounts []int
	// BodyBytes is the size of each JSON body. Default 500.
	BodyBytes int
	// TxnRows is how many backlog rows each insert transaction holds.
	// Default 500.
	TxnRows int
	// Workers is the relay's --workers and the bare client's concurrency.
	// Default 64.
	Workers int
	// Rate is the steady producer's events per second. Default 1000.
	// Rates, when set, wins.
	Rate int
	// Rates are steady rates: latency, bare-latency and peer-latency run
	// once per rate, in the order given; fairness runs at the first.
	// Default [Rate].
	Rates []int
	// Duration is how long the steady producer runs. Default 20s.
	Duration time.Duration
	// Producers is how many connections the steady producer commits on,
	// so one slow commit does not delay the next. Default 0: auto, one
	// per 250 events/s of the phase's rate, at least 4 (see producersFor).
	Producers int
	// VerifySignatures makes the receiver verify every request's
	// signature, and the bare client sign its requests as the relay does.
	// Default off: it costs receiver CPU the relay shares.
	VerifySignatures bool
	// PGSettings are extra postgresql.conf settings for the bench's
	// cluster. Default none.
	PGSettings map[string]string
	// ReceiverJSON makes the receiver decode every body with
	// encoding/json, as a webhook handler would. Default off.
	ReceiverJSON bool
	// BareClient is what the bare client posts with: "net/http" (Go's
	// client, the ceiling the benchmark issue names) or "lean" (the
	// relay's own HTTP/1.1 transport, internal/h1, which the relay uses
	// for http:// by default). Default "net/http".
	BareClient string
	// Timeout bounds each phase's wait for the last delivery. Default 5m,
	// or 1ms per event of the largest backlog if that is longer.
	Timeout time.Duration
	// FairBacklog is tenant A's backlog in the fairness phase. Default 100,000.
	FairBacklog int
	// FairDelay is how long tenant A's receiver takes to answer in the
	// fairness phase. Default 20ms.
	FairDelay time.Duration
	// Faults configures the fault phases (recovery, takeover, ratelimit,
	// memory).
	Faults FaultConfig
	// Endpoints is how many endpoints drain-many and peer-drain-many
	// spread the backlog over, round robin. Default 10,000.
	Endpoints int
	// Tenants is how many tenants own those endpoints (endpoint i belongs
	// to tenant i mod Tenants). Default 1,000.
	Tenants int

	// Progress receives one line per step. Default: discard.
	Progress io.Writer
}

func (c Config) withDefaults() Config {
	if len(c.Phases) == 0 {
		c.Phases = AllPhases
	}
	c.Events = cmp.Or(c.Events, 200_000)
	c.Rate = cmp.Or(c.Rate, 1000)
	c.scaleDefaults()
	c.BodyBytes = cmp.Or(c.BodyBytes, 500)
	c.TxnRows = cmp.Or(c.TxnRows, 500)
	c.Workers = cmp.Or(c.Workers, 64)
	c.Duration = cmp.Or(c.Duration, 20*time.Second)
	c.FairBacklog = cmp.Or(c.FairBacklog, 100_000)
	c.FairDelay = cmp.Or(c.FairDelay, 20*time.Millisecond)
	c.Faults = c.Faults.withDefaults()
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return c
}

// Validate reports invalid fields, by name.
func (c Config) Validate() error {
	var errs []error
	for name, v := range map[string]int{"Events": c.Events, "BodyBytes": c.BodyBytes, "TxnRows": c.TxnRows,
		"Workers": c.Workers, "Rate": c.Rate, "Producers": c.Producers, "Endpoints": c.Endpoints, "Tenants": c.Tenants} {
		if v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %d)", name, v))
		}
	}
	if c.BareClient != "" && c.BareClient != BareNetHTTP && c.BareClient != BareLean {
		errs = append(errs, fmt.Errorf("BareClient must be %q or %q (got %q)", BareNetHTTP, BareLean, c.BareClient))
	}
	if c.BodyBytes != 0 && c.BodyBytes < 64 {
		errs = append(errs, fmt.Errorf("BodyBytes must be at least 64 (got %d)", c.BodyBytes))
	}
	if c.Duration < 0 {
		errs = append(errs, fmt.Errorf("negative Duration (got %s)", c.Duration))
	}
	errs = append(errs, c.validateScale()...)
	for _, p := range c.Phases {
		if !slices.Contains(KnownPhases, p) {
			errs = append(errs, fmt.Errorf("unknown phase %q in Phases", p))
		}
	}
	needRelay := len(c.Phases) == 0 || slices.ContainsFunc(c.Phases, func(p string) bool { return p != PhaseBare })
	if needRelay && c.RelayExe == "" {
		errs = append(errs, errors.New("every phase but bare needs RelayExe (the outbox-relay binary; bare-latency posts from its hidden 'bench paced-post', the peer's table is made LIKE relay.outbox)"))
	}
	errs = append(errs, c.Faults.validate())
	return errors.Join(errs...)
}

// Tags of the phases' event ids, so one phase's stragglers never count in
// another's tally.
const (
	tagBare        uint32 = 0xbe000001
	tagDrain       uint32 = 0xbe000002
	tagLatency     uint32 = 0xbe000003
	tagBareLatency uint32 = 0xbe000004
	tagProbe       uint32 = 0xbe000005
	// 0xbe000006 to 0xbe00000f: peer.go and fairness.go; 0xbe000010 to
	// 0xbe00001f: faults.go.
)

// run is the state of one Run.
type run struct {
	cfg    Config
	res    *Result
	pool   *pgxpool.Pool
	dbURL  string
	rcv    *receiver
	secret signer.Secret
	// secretText is secret as relay.endpoints stores it.
	secretText string
	relay      *relayProc
	backlog    bool // the backlog has been inserted
	retired    bool // the relay was stopped for the peer's phases

	// cluster is the bench's cluster; the fault phases add databases to it.
	cluster    *pgtemp.Cluster
	scaleState // scale.go: the round of the step running, endpoints
}

// Run starts a durable throwaway cluster and a receiver, runs the phases,
// and returns the figures. The cluster and the relay are gone when it
// returns.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench config: %w", err)
	}
	cfg = cfg.withDefaults()
	res := &Result{
		CPUs: runtime.NumCPU(), GoVersion: runtime.Version(),
		Events: cfg.Events, BodyBytes: cfg.BodyBytes, Workers: cfg.Workers, TxnRows: cfg.TxnRows,
		Rate: cfg.Rate, DurationSecs: cfg.Duration.Seconds(), VerifySignatures: cfg.VerifySignatures, ReceiverJSON: cfg.ReceiverJSON, PGSettings: cfg.PGSettings,
		BareClient: cmp.Or(cfg.BareClient, BareNetHTTP),
		Phases:     cfg.Phases,
	}
	r := &run{cfg: cfg, res: res}
	r.progress("starting a durable throwaway PostgreSQL cluster (fsync on)")
	cluster, err := pgtemp.Start(ctx, pgtemp.Options{Durable: true, Settings: cfg.PGSettings})
	if err != nil {
		return nil, err
	}
	defer cluster.Stop()
	r.cluster = cluster
	if r.dbURL, err = cluster.CreateDatabase(ctx, "bench"); err != nil {
		return nil, err
	}
	if r.pool, err = newPool(ctx, r.dbURL, cfg); err != nil {
		return nil, err
	}
	defer r.pool.Close()
	if err := r.pool.QueryRow(ctx, `SHOW server_version`).Scan(&res.PostgresVersion); err != nil {
		return nil, err
	}
	if r.rcv, err = startReceiver(cfg.ReceiverJSON); err != nil {
		return nil, err
	}
	defer r.rcv.close()
	defer r.stopRelay()
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	for _, st := range r.plan() { // fixed order, whatever the flag's order
		phase := st.phase
		if err := r.at(ctx, st); err != nil {
			return res, fmt.Errorf("%s: %w", st, err)
		}
		var err error
		switch phase {
		case PhaseBare:
			err = r.bare(ctx)
		case PhaseDrain:
			err = r.drain(ctx)
		case PhaseLatency:
			err = r.latency(ctx)
		case PhaseBareLatency:
			err = r.bareLatency(ctx)
		case PhaseFairness:
			err = r.fairness(ctx)
		case PhasePeerDrain:
			err = r.peerDrain(ctx)
		case PhasePeerLatency:
			err = r.peerLatency(ctx)
		case PhaseRecovery:
			err = r.recovery(ctx)
		case PhaseTakeover:
			err = r.takeover(ctx)
		case PhaseRateLimit:
			err = r.ratelimit(ctx)
		case PhaseMemory:
			err = r.memory(ctx)
		case PhaseDrainMany:
			err = r.drainMany(ctx)
		case PhasePeerDrainMany:
			err = r.peerDrainMany(ctx)
		}
		if err != nil {
			return res, fmt.Errorf("%s: %w", st, err)
		}
		r.record(st)
	}
	if r.relay != nil {
		if err := r.relay.exited(); err != nil {
			return res, err
		}
		res.RelayPeakRSS, _, _ = r.relay.memory()
	}
	return res, nil
}

func (r *run) progress(format string, args ...any) {
	fmt.Fprintf(r.cfg.Progress, "bench: "+format+"\n", args...)
}

// setup applies the schema and creates the publication and slot with the
// real binary's migrate (so WAL from now on is kept for the relay), and
// registers one endpoint pointing at the receiver.
func (r *run) setup(ctx context.Context) error {
	if r.cfg.RelayExe != "" {
		out, err := exec.CommandContext(ctx, r.cfg.RelayExe, "migrate", "--database-url", r.dbURL).CombinedOutput()
		if err != nil {
			return fmt.Errorf("outbox-relay migrate: %v\n%s", err, out)
		}
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	secret := "whsec_" + base64.StdEncoding.EncodeToString(key)
	r.secretText = secret
	var err error
	if r.secret, err = signer.ParseSecret(secret); err != nil {
		return err
	}
	if r.cfg.RelayExe == "" {
		return nil // bare phases only: no schema needed
	}
	_, err = r.pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep_bench', 'bench', $1, ARRAY[$2])`,
		r.rcv.url, secret)
	if err != nil {
		return fmt.Errorf("register endpoint: %w", err)
	}
	return nil
}

// bareSigner signs the bare client's requests when the receiver verifies
// signatures, so both sides send what a receiver would accept; nil
// otherwise.
func (r *run) bareSigner() *signer.Signer {
	if !r.cfg.VerifySignatures {
		return nil
	}
	return signer.NewSigner(r.secret)
}

func (r *run) verifier() *signer.Verifier {
	if !r.cfg.VerifySignatures {
		return nil
	}
	return &signer.Verifier{Secrets: []signer.Secret{r.secret}}
}

func (r *run) walLSN(ctx context.Context) (int64, error) {
	var lsn int64
	err := r.pool.QueryRow(ctx, `SELECT pg_current_wal_lsn() - '0/0'::pg_lsn`).Scan(&lsn)
	if err != nil {
		return 0, fmt.Errorf("read WAL position: %w", err)
	}
	return lsn, nil
}

// insertBacklog inserts the drain phase's events in TxnRows-row
// transactions, with COPY, while no relay runs.
func (r *run) insertBacklog(ctx context.Context) error {
	if r.backlog {
		return nil
	}
	r.progress("inserting %d events of %d bytes in %d-row transactions", r.cfg.Events, r.cfg.BodyBytes, r.cfg.TxnRows)
	lsn0, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	conn, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
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
			_, err := tx.CopyFrom(ctx, pgx.Identifier{"relay", "outbox"}, cols, pgx.CopyFromSlice(n, func(i int) ([]any, error) {
				return []any{eventID(r.tag(tagDrain), from+i), "bench", "bench.event", bodies[i]}, nil
			}))
			return err
		})
		if err != nil {
			return fmt.Errorf("insert backlog: %w", err)
		}
	}
	took := time.Since(start)
	lsn1, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	r.res.InsertPerSec = float64(r.cfg.Events) / took.Seconds()
	r.res.InsertWALPerEvent = float64(lsn1-lsn0) / float64(max(1, r.cfg.Events))
	r.backlog = true
	return nil
}

// bare posts the backlog's bodies with the bare client: the ceiling.
func (r *run) bare(ctx context.Context) error {
	r.progress("bare HTTP client: %d posts, %d concurrent", r.cfg.Events, r.cfg.Workers)
	tl := newTally(r.tag(tagBare), r.cfg.Events, r.cfg.BodyBytes, false, r.verifier())
	r.rcv.expect(tl)
	c := newBareClient(r.rcv.url, r.cfg.Workers, r.cfg.BodyBytes, r.bareSigner(), r.cfg.BareClient == BareLean)
	defer c.CloseIdleConnections()
	cpu0 := r.cpuNow()
	took, err := c.drain(ctx, r.tag(tagBare), r.cfg.Events, r.cfg.Workers)
	if err != nil {
		return err
	}
	r.res.Bare = &Throughput{Seconds: took.Seconds(), PerSec: float64(r.cfg.Events) / took.Seconds(), CPU: split(cpu0, r.cpuNow(), r.cfg.Events)}
	r.res.Bare.count(tl)
	return nil
}

// relayArgs is the relay's command line.
func (r *run) relayArgs(opsAddr string) []string {
	args := append([]string(nil), r.cfg.RelayPrefix...)
	args = append(args, "run", "--database-url", r.dbURL, "--allow-networks", "127.0.0.0/8",
		"--workers", fmt.Sprint(r.cfg.Workers), "--http-addr", opsAddr, "--log-level", "warn")
	return append(args, r.cfg.RelayArgs...)
}

func (r *run) startRelay() error {
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	p, err := startRelay(r.cfg.RelayExe, r.relayArgs(addr))
	if err != nil {
		return err
	}
	p.opsAddr = addr
	r.relay = p
	return nil
}

func (r *run) stopRelay() {
	if r.relay != nil {
		r.relay.stop(30 * time.Second)
	}
}

// wait waits for tl to be complete, the relay to die, ctx or the timeout.
func (r *run) wait(ctx context.Context, tl *tally, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tl.done:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return fmt.Errorf("timed out after %s: %d of %d events arrived", timeout, tl.distinct.Load(), tl.n)
		case <-tick.C:
			if r.relay != nil {
				if err := r.relay.exited(); err != nil {
					return err
				}
			}
		}
	}
}

// succeeded waits until n delivery rows with the given id tag are
// succeeded, and returns how many rows of that tag are in another state.
func (r *run) succeeded(ctx context.Context, tag uint32, n int, timeout time.Duration) (other int, err error) {
	lo, hi := eventID(tag, 0), eventID(tag+1, 0)
	deadline := time.Now().Add(timeout)
	for {
		var ok int
		err := r.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state <> 'succeeded')
FROM relay.deliveries WHERE event_id >= $1 AND event_id < $2`, lo, hi).Scan(&ok, &other)
		if err != nil {
			return 0, fmt.Errorf("count status rows: %w", err)
		}
		if ok >= n {
			return other, nil
		}
		if time.Now().After(deadline) {
			return other, fmt.Errorf("timed out after %s: %d of %d status rows succeeded (%d in another state)", timeout, ok, n, other)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// drain inserts the backlog, starts the relay and times it.
func (r *run) drain(ctx context.Context) error {
	if err := r.insertBacklog(ctx); err != nil {
		return err
	}
	if r.relay != nil {
		return errors.New("the relay must not run before the drain")
	}
	tl := newTally(r.tag(tagDrain), r.cfg.Events, r.cfg.BodyBytes, false, r.verifier())
	r.rcv.expect(tl)
	r.progress("relay drains %d events (%s)", r.cfg.Events, strings.Join(r.relayArgs("<ops>"), " "))
	d, err := r.timeRelayDrain(ctx, tl, r.tag(tagDrain), r.cfg.Events)
	if err != nil {
		return err
	}
	r.res.Drain = d
	r.res.DrainRSS, _, _ = r.relay.memory()
	return nil
}

// timeRelayDrain starts the relay and times it from exec until the
// receiver has every event of tl and the n status rows of tag are
// succeeded; it returns the drain's figures.
func (r *run) timeRelayDrain(ctx context.Context, tl *tally, tag uint32, n int) (*Drain, error) {
	lsn0, err := r.walLSN(ctx)
	if err != nil {
		return nil, err
	}
	cpu0 := r.cpuNow()
	start := time.Now()
	if err := r.startRelay(); err != nil {
		return nil, err
	}
	if err := r.wait(ctx, tl, r.cfg.Timeout); err != nil {
		return nil, err
	}
	received := time.Since(start)
	other, err := r.succeeded(ctx, tag, n, r.cfg.Timeout)
	if err != nil {
		return nil, err
	}
	took := time.Since(start)
	cpu1 := r.cpuNow()
	cpu, err := r.relay.cpu()
	if err != nil {
		return nil, err
	}
	lsn1, err := r.walLSN(ctx)
	if err != nil {
		return nil, err
	}
	d := &Drain{
		Throughput:       Throughput{Seconds: took.Seconds(), PerSec: float64(n) / took.Seconds(), CPU: split(cpu0, cpu1, n)},
		ReceivedSecs:     received.Seconds(),
		FirstArrivalSecs: float64(tl.first.Load()-start.UnixNano()) / 1e9,
		OtherRows:        other,
		Cost:             cost(cpu, n, lsn1-lsn0),
		Spilled:          r.relay.metric(ctx, "outbox_relay_spilled_total"),
		Loaded:           r.relay.metric(ctx, "outbox_relay_loaded_total"),
	}
	d.count(tl)
	return d, nil
}

func cost(cpu time.Duration, events int, wal int64) Cost {
	n := float64(max(1, events))
	return Cost{
		CPUSecs:       cpu.Seconds(),
		CPUPer10k:     cpu.Seconds() / n * 10_000,
		CPUPerEvent:   float64(cpu.Microseconds()) / n,
		WALPerEvent:   float64(wal) / n,
		WALBytes:      wal,
		EventsCounted: events,
	}
}

// latency runs the steady producer with the relay running.
func (r *run) latency(ctx context.Context) error {
	if r.relay == nil {
		r.progress("starting the relay")
		if err := r.startRelay(); err != nil {
			return err
		}
	}
	// One probe event end to end: the relay is connected and streaming.
	probe := newTally(r.tag(tagProbe), 1, r.cfg.BodyBytes, false, nil)
	r.rcv.expect(probe)
	if _, err := r.pool.Exec(ctx, `INSERT INTO relay.outbox (id, tenant_id, event_type, payload) VALUES ($1, 'bench', 'bench.probe', $2)`,
		eventID(r.tag(tagProbe), 0), appendBody(nil, 0, time.Now().UnixNano(), r.cfg.BodyBytes)); err != nil {
		return fmt.Errorf("insert probe: %w", err)
	}
	if err := r.wait(ctx, probe, time.Minute); err != nil {
		return fmt.Errorf("probe event: %w", err)
	}

	n := int(float64(r.cfg.Rate) * r.cfg.Duration.Seconds())
	tl := newTally(r.tag(tagLatency), n, r.cfg.BodyBytes, true, r.verifier())
	r.rcv.expect(tl)
	cpu0, err := r.relay.cpu()
	if err != nil {
		return err
	}
	lsn0, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	r.progress("steady producer: %d single-row transactions/s for %s on %d connections, relay delivering", r.cfg.Rate, r.cfg.Duration, r.cfg.Producers)
	const insert = `INSERT INTO relay.outbox (id, tenant_id, event_type, payload) VALUES ($1, 'bench', 'bench.event', $2)`
	steady, err := r.produceSteady(ctx, insert, r.tag(tagLatency))
	if err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	if err := r.wait(ctx, tl, r.cfg.Timeout); err != nil {
		return err
	}
	if _, err := r.succeeded(ctx, r.tag(tagLatency), n, r.cfg.Timeout); err != nil {
		return err
	}
	cpu1, err := r.relay.cpu()
	if err != nil {
		return err
	}
	lsn1, err := r.walLSN(ctx)
	if err != nil {
		return err
	}
	l := steady.latency(tl)
	c := cost(cpu1-cpu0, steady.sent, lsn1-lsn0)
	l.Cost = &c
	r.res.Latency = l
	return nil
}

// bareLatency posts directly at the steady rate: the HTTP floor of
// commit-to-delivery, with no database and no relay, from a child process
// whose CPU per request is the floor under the relay's at this rate.
func (r *run) bareLatency(ctx context.Context) error {
	n := int(float64(r.cfg.Rate) * r.cfg.Duration.Seconds())
	tl := newTally(r.tag(tagBareLatency), n, r.cfg.BodyBytes, true, r.verifier())
	r.rcv.expect(tl)
	r.progress("bare HTTP client (%s, a process of its own with one P): %d posts/s for %s", r.cfg.BareClient, r.cfg.Rate, r.cfg.Duration)
	plan := PostPlan{URL: r.rcv.url, Rate: r.cfg.Rate, Duration: r.cfg.Duration, Workers: r.cfg.Workers, BodyBytes: r.cfg.BodyBytes,
		Tag: r.tag(tagBareLatency), Lean: r.cfg.BareClient == BareLean}
	if r.cfg.VerifySignatures {
		plan.Secret = r.secretText
	}
	post, err := r.pacedPostChild(ctx, plan)
	if err != nil {
		return err
	}
	if err := r.wait(ctx, tl, r.cfg.Timeout); err != nil {
		return err
	}
	l := latencyOf(tl, post.Sent, post.Rate)
	l.ClientCPU = post.CPUSecs * 1e6 / float64(max(1, post.Sent))
	r.res.BareLatency = l
	return nil
}

// produceSteady commits single-row transactions (insert, with $1 the
// event id and $2 the body) at the configured rate and duration on
// Producers connections. The clock is read just before the statement that
// commits (an autocommit INSERT is a one-row transaction), so a latency
// measured from it includes the INSERT and the COMMIT themselves.
func (r *run) produceSteady(ctx context.Context, insert string, tag uint32) (*steadyRun, error) {
	bufs := make(chan []byte, r.cfg.Producers)
	for range r.cfg.Producers {
		bufs <- nil
	}
	n := int(float64(r.cfg.Rate) * r.cfg.Duration.Seconds())
	commits := make([]time.Duration, n)
	sent, rate, err := paced(ctx, r.cfg.Rate, r.cfg.Duration, r.cfg.Producers, func(seq int) error {
		buf := <-bufs
		defer func() { bufs <- buf }()
		t0 := time.Now()
		buf = appendBody(buf[:0], seq, t0.UnixNano(), r.cfg.BodyBytes)
		_, err := r.pool.Exec(ctx, insert, eventID(tag, seq), buf)
		if seq < len(commits) {
			commits[seq] = time.Since(t0)
		}
		return err
	})
	return &steadyRun{sent: sent, rate: rate, commits: commits[:min(sent, len(commits))]}, err
}

// steadyRun is what the steady producer did: how many it committed, at
// what rate, and how long each INSERT took to commit (in the order sent,
// which paced keeps only roughly: a failed run may leave gaps as zeros).
type steadyRun struct {
	sent    int
	rate    float64
	commits []time.Duration
}

// latency is tl's latency figures with the producer's commit times, and
// the latency of each event counted from its COMMIT's return instead of
// from before its INSERT.
func (s *steadyRun) latency(tl *tally) *Latency {
	l := latencyOf(tl, s.sent, s.rate)
	c := slices.Clone(s.commits)
	slices.Sort(c)
	if len(c) > 0 {
		l.CommitP50, l.CommitP99 = ms(quantile(c, 0.50)), ms(quantile(c, 0.99))
	}
	if after := tl.afterCommit(s.commits); len(after) > 0 {
		l.AfterP50, l.AfterP99, l.AfterP999 = ms(quantile(after, 0.50)), ms(quantile(after, 0.99)), ms(quantile(after, 0.999))
	}
	return l
}

// ParseSettings reads comma-separated name=value postgresql.conf settings.
func ParseSettings(s string) (map[string]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		name, value, ok := strings.Cut(strings.TrimSpace(kv), "=")
		name, value = strings.TrimSpace(name), strings.TrimSpace(value)
		if !ok || name == "" || value == "" {
			return nil, fmt.Errorf("%q is not name=value", kv)
		}
		out[name] = value
	}
	return out, nil
}
